"""Visualizer: the book's thin layer over Visdom, which never holds training up.

Every call is recorded to a replayable log file (when one is given) and handed to a
background thread that posts it; the training thread never waits for the network.
No server at the start, or another program on the port: one warning says so. A server
that stops answering mid-run costs one timeout in the background thread, not one per
plot; it is probed every few seconds, and when it (or a restarted one) answers again,
every window is redrawn in full. `python main.py replay --file=LOG` replays a record.
"""
import atexit
import functools
import html
import http.client
import json
import math
import os
import queue
import threading
import time
import warnings
from urllib.parse import urlparse

import numpy as np
import visdom
from PIL import Image, ImageDraw, ImageFont

from utils.errors import UserError
from utils.visdom_server import check_server_url, not_visdom, page_answers, what_answers


class Sender(threading.Thread):
    """Posts (endpoint, message) pairs to the server from a daemon thread over one
    kept-alive connection. While the server is down, messages are dropped (the record
    file has them) and the server is probed every `retry_every` seconds. `resync` is set
    when windows need a redraw: after an outage, a full queue or a new connection (a
    restarted server has lost them, and visdom makes a missing chart from an append
    alone). `rejected` holds the HTTP status of a refused POST: no Visdom there."""

    def __init__(self, server, port, online, retry_every=5.0, timeout=(1.0, 5.0), maxsize=1000):
        super().__init__(daemon=True, name='visdom-sender')
        url = urlparse(server)
        self.scheme, self.host, self.port = url.scheme, url.hostname, port
        self.online, self.retry_every, self.timeout = online, retry_every, timeout
        self.queue = queue.Queue(maxsize)
        self.count = 0  # messages put so far, dropped or not
        self.connection = None
        self.resync = threading.Event()
        self.rejected, self.overflowed = None, False
        self.closing = threading.Event()
        self.start()

    def put(self, endpoint, msg):
        if self.closing.is_set():
            return
        self.count += 1
        if not self.online:
            return
        try:
            self.queue.put_nowait((self.count - 1, endpoint, msg))
        except queue.Full:  # the server is slower than training: redraw once it drains
            self.overflowed = True

    def run(self):
        while True:
            if not self.online:
                if self.closing.wait(self.retry_every):
                    break
                if page_answers(self.port, self.host, scheme=self.scheme):
                    self.reconnect()
                continue
            item = self.queue.get()
            if item is None:
                break
            self.deliver(*item)
        self.disconnect()

    def reconnect(self):  # connected here, so that the first post asks no second redraw
        try:
            self.connection = self.connect()
        except OSError:
            return
        self.online = True
        self.resync.set()

    def deliver(self, number, endpoint, msg):
        try:
            status = self.post(endpoint, json.dumps(msg).encode(), first=number == 0)
        except (OSError, http.client.HTTPException):
            return self.go_offline()
        refused = not 200 <= status < 300
        if refused and endpoint != 'update':  # a full draw refused, e.g. 501 from http.server
            self.rejected = status
            return self.go_offline()
        if refused:  # visdom's 500 to an append to an env it lacks: it restarted
            self.resync.set()
        elif self.overflowed and self.queue.empty():
            self.overflowed = False
            self.resync.set()

    def post(self, endpoint, body, first):
        """The HTTP status of one POST. A kept-alive connection the server closed (it
        restarted) is replaced once; a timeout is not retried (a hung server would cost
        two). Windows posted over an earlier connection may be gone: redraw them."""
        if self.connection is not None:
            try:
                return self.request(endpoint, body)
            except (ConnectionError, http.client.HTTPException):
                self.disconnect()
        self.connection = self.connect()
        if not first:
            self.resync.set()
        return self.request(endpoint, body)

    def connect(self):
        kind = http.client.HTTPSConnection if self.scheme == 'https' else http.client.HTTPConnection
        connection = kind(self.host, self.port, timeout=self.timeout[0])
        connection.connect()
        connection.sock.settimeout(self.timeout[1])  # connecting is quick; answering may not be
        return connection

    def request(self, endpoint, body):
        self.connection.request('POST', f'/{endpoint}', body)
        reply = self.connection.getresponse()
        reply.read()  # the connection serves the next request only once this one is read
        return reply.status

    def disconnect(self):
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def go_offline(self):
        self.online = False
        self.disconnect()
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
    a confusion-matrix heatmap, captioned image grids and galleries; any other
    attribute is passed to the underlying visdom client."""

    def __init__(self, env='default', port=8097, server='http://localhost', record_file=None,
                 log_warnings=True, retry_every=5.0):
        server = check_server_url(server)
        self.env = env
        self.charts = {}  # chart -> {line: (xs, ys)}
        self.next_x = {}
        self.redraw = {}  # window -> function drawing it in full
        self.log_text = ''
        self.closed = self.rejection_told = False
        self.previous_showwarning = None
        self.where = (f'; the plots are recorded to {record_file} (later: python main.py '
                      f'replay --file={record_file})' if record_file else '')
        if record_file:
            os.makedirs(os.path.dirname(os.path.abspath(record_file)), exist_ok=True)
        url = urlparse(server)  # a loaded server may be slow; a free port refuses at once
        answer = what_answers(port, url.hostname, timeout=3.0, scheme=url.scheme)
        self.sender = Sender(server, port, answer == 'visdom', retry_every)
        self.vis = QueuedClient(self.sender, env, record_file)
        atexit.register(self.close)
        if log_warnings:  # the log pane shows every warning the run raises from now on
            self.previous_showwarning = warnings.showwarning
            warnings.showwarning = self.show_warning
        if answer is None:
            warnings.warn(f'no Visdom server at {server}:{port}: training goes on without live '
                          f'plots{self.where}. Start one with `python -m visdom.server -port '
                          f'{port}` (it is picked up within seconds), or pass --vis=False')
        elif answer == 'other':
            warnings.warn(f'{not_visdom(server, port)}: training goes on without live plots'
                          f'{self.where}. Stop that program, or start Visdom on a free port '
                          f'(`python -m visdom.server -port N`, then --vis_port=N)')

    def catch_up(self):
        """After an outage or a full queue, draw every window again in full; say once
        when the server refused a plot."""
        if self.sender.resync.is_set():
            self.sender.resync.clear()
            for draw in list(self.redraw.values()):
                draw()
        if self.sender.rejected and not self.rejection_told:
            self.rejection_told = True
            sender = self.sender
            warnings.warn(f'{sender.scheme}://{sender.host}:{sender.port} answered a plot with '
                          f'HTTP {sender.rejected}: it is not a Visdom server, or one that needs '
                          f'a login; training goes on without live plots{self.where}')

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
        """A grid of images (N,3,H,W) with each caption written under its image and the
        count of each caption under the grid. Pass the normalisation's mean and std to
        show the pixels the camera took."""
        tiles = [captioned(image, caption) for image, caption in
                 zip(pixels(images, mean, std), captions)]
        counts = ', '.join(f'{captions.count(c)} {c}' for c in sorted(set(captions)))
        self.show_tiles(name, tiles, nrow, dict(title=title or name, caption=counts))

    def gallery(self, name, images, captions, title=None, nrow=4, mean=None, std=None):
        """Images (N,3,H,W) in one pane, `nrow` to a row, each over its caption, e.g. the
        most confident mistakes. A caption's lines go one under another, as in
        'dog\\nP(dog)=0.03\\ndog.123.jpg'; tiles are wider than img_grid's for them."""
        if len(captions) == 0:  # nothing to show, e.g. no mistakes
            return
        lines = max(str(caption).count('\n') + 1 for caption in captions)
        tiles = [captioned(image, caption, width=128, lines=lines) for image, caption in
                 zip(pixels(images, mean, std), captions)]
        self.show_tiles(name, tiles, nrow, dict(title=title or name))

    def show_tiles(self, name, tiles, nrow, opts):
        tiles = np.stack(tiles)
        rows, height, width = math.ceil(len(tiles) / nrow), tiles.shape[2], tiles.shape[3]
        # a pane that fits the grid: visdom pads each tile by 2 pixels all round
        opts.update(width=min(nrow, len(tiles)) * (width + 4), height=rows * (height + 4) + 80)
        self.show(name, lambda: self.vis.images(tiles, nrow=nrow, win=name, opts=opts))

    def confusion(self, name, matrix, labels=('cat', 'dog')):
        """Heatmap of a confusion matrix with the counts in its cells: rows = true class,
        columns = predicted. Plotly draws row 0 at the bottom, so rows go in reversed to
        read top-down; the counts are layout annotations, placed by row and column name."""
        matrix = np.asarray(matrix, dtype=float)
        columns, rows = [f'predicted {c}' for c in labels], [f'true {c}' for c in labels]
        middle = (matrix.min() + matrix.max()) / 2  # Viridis: dark below, yellow above
        cells = [dict(x=columns[j], y=rows[i], showarrow=False,
                      text=np.format_float_positional(value, precision=3, trim='-'),
                      font=dict(size=16, color='black' if value > middle else 'white'))
                 for (i, j), value in np.ndenumerate(matrix)]
        opts = dict(title=name, columnnames=columns, rownames=rows[::-1],
                    layoutopts=dict(plotly=dict(annotations=cells)))
        reversed_rows = matrix[::-1].copy()
        self.show(name, lambda: self.vis.heatmap(reversed_rows, win=name, opts=opts))

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


def pixels(images, mean=None, std=None):
    """Images (N,3,H,W) as floats in [0,1]: a tensor or an array, uint8 or float, with
    the normalisation undone when its mean and std are given."""
    if hasattr(images, 'detach'):
        images = images.detach().float().cpu().numpy()
    array = np.asarray(images)
    array = array / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if mean is not None:
        array = array * np.reshape(std, (1, -1, 1, 1)) + np.reshape(mean, (1, -1, 1, 1))
    return array.clip(0, 1)


LINE_HEIGHT = 12  # pixels per caption line, for the 10-pixel default font


@functools.cache
def caption_font():
    return ImageFont.load_default()


def captioned(image, caption, width=96, lines=1):
    """One image (3,H,W in [0,1]) resized to `width` pixels across (small enough for a
    batch of 224-pixel images to fit the page, large enough to see 32-pixel ones), with
    `caption` (up to `lines` lines) written in a white strip below it; uint8 (3,H',W')."""
    picture = Image.fromarray((image.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    height = round(width * picture.height / picture.width)
    picture = picture.resize((width, height),
                             Image.NEAREST if width >= picture.width else Image.BILINEAR)
    tile = Image.new('RGB', (width, height + 2 + LINE_HEIGHT * lines), 'white')
    tile.paste(picture, (0, 0))
    font = caption_font()  # Pillow steps lines by the height of 'A' plus the spacing
    ImageDraw.Draw(tile).multiline_text((2, height + 1), str(caption), fill='black', font=font,
                                        spacing=LINE_HEIGHT - font.getbbox('A')[3])
    return np.asarray(tile).transpose(2, 0, 1)


def replay(record_file, server='http://localhost', port=8097):
    """Send a recorded log to a running server; returns the number of messages."""
    if not os.path.isfile(record_file):
        raise UserError(f'--file={record_file!r}: no such recorded Visdom log (training writes '
                        f'them to --checkpoint_dir as visdom_<env>_<time>.log)')
    server = check_server_url(server)
    url = urlparse(server)
    answer = what_answers(port, url.hostname, scheme=url.scheme)
    if answer != 'visdom':
        found = not_visdom(server, port) if answer else f'no Visdom server at {server}:{port}'
        raise UserError(f'{found}; to replay, start one with `python -m visdom.server '
                        f'-port {port}` or pass --vis_port/--vis_server')
    client = visdom.Visdom(server=server, port=port, raise_exceptions=True,
                           use_incoming_socket=False)
    try:
        client.replay_log(record_file)
    except (ValueError, KeyError) as exc:
        raise UserError(f'--file={record_file!r} is not a recorded Visdom log ({exc})') from None
    with open(record_file) as f:
        return sum(1 for _ in f)
