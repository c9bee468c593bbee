"""Visualizer: the book's thin layer over Visdom, which never holds training up.

Every call is recorded to a replayable log file (when one is given) and handed to a
background thread that posts it; the training thread never waits for the network.
No server at the start: one warning says how to start one. A server that stops
answering mid-run costs one timeout in the background thread, not one per plot; it is
probed every few seconds, and when it answers again every window is redrawn in full.
`python main.py replay --file=LOG` sends a recorded log to a server later.
"""
import atexit
import functools
import html
import json
import math
import os
import queue
import threading
import time
import warnings
from urllib.parse import urlparse

import numpy as np
import requests
import visdom
from PIL import Image, ImageDraw, ImageFont

from utils.errors import UserError
from utils.visdom_server import page_answers


class Sender(threading.Thread):
    """Posts (endpoint, message) pairs to the server from a daemon thread. While the
    server is down, messages are dropped (the record file has them) and the server is
    probed every `retry_every` seconds; `resync` is set when windows need a redraw."""

    def __init__(self, host, port, online, retry_every=5.0, timeout=(1.0, 5.0), maxsize=1000):
        super().__init__(daemon=True, name='visdom-sender')
        self.host, self.port, self.base = host, port, f'http://{host}:{port}'
        self.online = online
        self.retry_every = retry_every
        self.timeout = timeout
        self.queue = queue.Queue(maxsize)
        self.resync = threading.Event()
        self.overflowed = False
        self.closing = threading.Event()
        self.session = requests.Session()
        self.session.trust_env = False  # a proxy from the environment must not catch localhost
        self.start()

    def put(self, endpoint, msg):
        if not self.online or self.closing.is_set():
            return
        try:
            self.queue.put_nowait((endpoint, msg))
        except queue.Full:  # the server is slower than training: redraw once it drains
            self.overflowed = True

    def run(self):
        while True:
            if not self.online:
                if self.closing.wait(self.retry_every):
                    return
                if page_answers(self.port, self.host):
                    self.online = True
                    self.resync.set()
                continue
            item = self.queue.get()
            if item is None:
                return
            endpoint, msg = item
            try:
                reply = self.session.post(f'{self.base}/{endpoint}', data=json.dumps(msg),
                                         timeout=self.timeout)
                if reply.text == 'win does not exist':  # closed in the page, or a new server
                    self.resync.set()
                if self.overflowed and self.queue.empty():
                    self.overflowed = False
                    self.resync.set()
            except requests.RequestException:
                self.online = False
                self.drain()

    def drain(self):
        self.overflowed = False  # the redraw after the outage covers it
        while True:
            try:
                if self.queue.get_nowait() is None:
                    self.closing.set()
            except queue.Empty:
                return

    def close(self, timeout=2.0):
        """Deliver what is queued, waiting at most `timeout` seconds."""
        if not self.is_alive():
            return
        self.closing.set()
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.join(timeout)


class QueuedClient(visdom.Visdom):
    """A visdom client in offline mode (it records, never posts) whose messages also go
    to a Sender. Calls return at once, so methods that read the server's reply
    (get_window_data, win_exists, ...) need a plain visdom.Visdom."""

    def __init__(self, sender, env, record_file):
        super().__init__(env=env, offline=True, log_to_filename=os.devnull)
        self.log_to_filename = record_file
        self.sender = sender

    def _send(self, msg, endpoint='events', quiet=False, from_log=False, create=True):
        result = super()._send(msg, endpoint, quiet, from_log, create)
        self.sender.put(endpoint, msg)
        return result


class Visualizer:
    """plot / plot_many / img / img_many / log as in the book, plus multi-line charts,
    a confusion-matrix heatmap and captioned image grids; any other attribute is
    passed to the underlying visdom client."""

    def __init__(self, env='default', port=8097, server='http://localhost', record_file=None,
                 log_warnings=True, retry_every=5.0):
        self.env = env
        self.charts = {}  # chart -> {line: (xs, ys)}
        self.next_x = {}
        self.redraw = {}  # window -> function drawing it in full
        self.log_text = ''
        self.record_file = record_file
        self.closed = False
        self.previous_showwarning = None
        if record_file:
            os.makedirs(os.path.dirname(os.path.abspath(record_file)), exist_ok=True)
        host = urlparse(server if '://' in server else f'http://{server}').hostname or 'localhost'
        online = page_answers(port, host, timeout=3.0)  # refused at once when none runs
        self.sender = Sender(host, port, online, retry_every)
        self.vis = QueuedClient(self.sender, env, record_file)
        atexit.register(self.close)
        if log_warnings:  # the log pane shows every warning the run raises from now on
            self.previous_showwarning = warnings.showwarning
            warnings.showwarning = self.show_warning
        if not online:
            where = (f'; the plots are recorded to {record_file} '
                     f'(later: python main.py replay --file={record_file})' if record_file else '')
            warnings.warn(f'no Visdom server at {server}:{port}: training goes on without live '
                          f'plots{where}. Start one with `python -m visdom.server -port {port}` '
                          f'(it is picked up within seconds), or pass --vis=False')

    def catch_up(self):
        """After an outage or a full queue, draw every window again in full."""
        if self.sender.resync.is_set():
            self.sender.resync.clear()
            for draw in list(self.redraw.values()):
                draw()

    def show(self, win, draw):
        """Draw a window whose every call replaces it; remember how, for catch_up."""
        self.catch_up()
        self.redraw[win] = draw
        draw()

    def plot(self, name, y, **opts):
        """Append one point to chart `name` (x counts calls); `opts` are visdom's
        line options, e.g. ytype='log'."""
        self.plot_lines(name, {name: y}, **opts)

    def plot_many(self, values):
        for name, y in values.items():
            self.plot(name, y)

    def plot_lines(self, name, values, x=None, **opts):
        """Append one point to each named line of chart `name`, e.g. train and val.
        Non-finite values leave a gap: NaN in the page's JSON would break it."""
        self.catch_up()
        chart = self.charts.setdefault(name, {})
        x = self.next_x.get(name, 0) if x is None else x
        self.next_x[name] = x + 1
        for line, y in values.items():
            if y is None or not math.isfinite(y):
                continue
            first = not chart
            xs, ys = chart.setdefault(line, ([], []))
            xs.append(x)
            ys.append(float(y))
            self.draw_line(name, line, [x], [float(y)], replace=first,
                           opts=dict(opts, title=name, showlegend=len(values) > 1))
        self.redraw[name] = lambda: self.draw_chart(name, opts)

    def draw_line(self, win, line, xs, ys, replace, opts):
        self.vis.line(X=np.array(xs), Y=np.array(ys), win=win, name=line,
                      update=None if replace else 'append', opts=opts)

    def draw_chart(self, win, opts):
        chart = self.charts[win]
        for i, (line, (xs, ys)) in enumerate(chart.items()):
            self.draw_line(win, line, xs, ys, replace=i == 0,
                           opts=dict(opts, title=win, showlegend=len(chart) > 1))

    def img(self, name, img):
        """Show an image (C,H,W) or a batch (N,C,H,W), values in [0,1] or [0,255]."""
        array = img.detach().cpu().numpy() if hasattr(img, 'detach') else np.asarray(img)
        self.show(name, lambda: self.vis.images(array, win=name, opts=dict(title=name)))

    def img_many(self, images):
        for name, img in images.items():
            self.img(name, img)

    def img_grid(self, name, images, captions, title=None, mean=None, std=None, nrow=8):
        """A grid of images (N,3,H,W) with each caption written under its image.
        Pass the normalisation's mean and std to show the pixels the camera took."""
        images = images.detach().float().cpu()
        if mean is not None:
            images = images * torch_like(images, std) + torch_like(images, mean)
        tiles = np.stack([captioned(image, caption)
                          for image, caption in zip(images.clamp(0, 1).numpy(), captions)])
        counts = ', '.join(f'{captions.count(c)} {c}' for c in sorted(set(captions)))
        rows, height, width = math.ceil(len(tiles) / nrow), tiles.shape[2], tiles.shape[3]
        opts = dict(title=title or name, caption=counts,  # a pane that fits the whole grid
                    width=min(nrow, len(tiles)) * (width + 2) + 40, height=rows * (height + 2) + 80)
        self.show(name, lambda: self.vis.images(tiles, nrow=nrow, win=name, opts=opts))

    def confusion(self, name, matrix, labels=('cat', 'dog')):
        """Heatmap of a confusion matrix: rows = true class, columns = predicted.
        Plotly draws row 0 at the bottom, so rows go in reversed to read top-down."""
        matrix = np.asarray(matrix, dtype=float)[::-1].copy()
        opts = dict(title=name, columnnames=[f'predicted {c}' for c in labels],
                    rownames=[f'true {c}' for c in reversed(labels)])
        self.show(name, lambda: self.vis.heatmap(matrix, win=name, opts=opts))

    def log(self, info, win='log'):
        """Add a timestamped line to an accumulating text pane."""
        self.log_text += f'[{time.strftime("%m-%d %H:%M:%S")}] {html.escape(str(info))}<br>'
        opts = dict(title=win, width=640, height=320)
        self.show(win, lambda: self.vis.text(self.log_text, win=win, opts=opts))

    def show_warning(self, message, category, filename, lineno, file=None, line=None):
        self.previous_showwarning(message, category, filename, lineno, file, line)
        if not self.closed:
            self.log(f'warning: {message}')

    def close(self, timeout=2.0):
        """Stop logging warnings and deliver queued plots (waits at most `timeout` s)."""
        if self.closed:
            return
        self.closed = True
        if self.previous_showwarning and warnings.showwarning == self.show_warning:
            warnings.showwarning = self.previous_showwarning
        self.sender.close(timeout)

    def __getattr__(self, name):
        if name == 'vis':  # not set: __init__ failed
            raise AttributeError(name)
        return getattr(self.vis, name)


def torch_like(images, values):
    return images.new_tensor(values).view(1, -1, 1, 1)


@functools.cache
def caption_font():
    return ImageFont.load_default()


def captioned(image, caption, width=96, strip=14):
    """One image (3,H,W in [0,1]) resized to `width` pixels across (small enough for a
    batch of 224-pixel images to fit the page, large enough to see 32-pixel ones), with
    `caption` written in a white strip below it; returned as uint8 (3,H',W')."""
    picture = Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    height = round(width * picture.height / picture.width)
    picture = picture.resize((width, height),
                             Image.NEAREST if width >= picture.width else Image.BILINEAR)
    tile = Image.new('RGB', (width, height + strip), 'white')
    tile.paste(picture, (0, 0))
    ImageDraw.Draw(tile).text((2, height + 1), str(caption), fill='black', font=caption_font())
    return np.asarray(tile).transpose(2, 0, 1)


def replay(record_file, server='http://localhost', port=8097):
    """Send a recorded log to a running server; returns the number of messages."""
    if not os.path.isfile(record_file):
        raise UserError(f'--file={record_file!r}: no such recorded Visdom log (training writes '
                        f'them to --checkpoint_dir as visdom_<env>_<time>.log)')
    host = urlparse(server if '://' in server else f'http://{server}').hostname or 'localhost'
    if not page_answers(port, host):
        raise UserError(f'no Visdom server at {server}:{port} to replay into: start one with '
                        f'`python -m visdom.server -port {port}` or pass --vis_port/--vis_server')
    client = visdom.Visdom(server=server, port=port, raise_exceptions=True,
                           use_incoming_socket=False)
    try:
        client.replay_log(record_file)
    except (ValueError, KeyError) as exc:
        raise UserError(f'--file={record_file!r} is not a recorded Visdom log ({exc})') from None
    with open(record_file) as f:
        return sum(1 for _ in f)
