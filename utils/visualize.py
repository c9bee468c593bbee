# coding: utf8
"""Visualizer: the book's thin layer over Visdom, which never holds training up.

With a server running, every call plots live. Without one, a single warning says how
to start it and every call is recorded to a log file that `python main.py replay`
sends to a server later.
"""
import os
import socket
import time
import warnings
from urllib.parse import urlparse

import numpy as np
import visdom


def server_is_up(server, port, timeout=1.0):
    host = urlparse(server if '://' in server else f'http://{server}').hostname or 'localhost'
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class Visualizer:
    """plot / plot_many / img / img_many / log as in the book, plus multi-line charts,
    a confusion-matrix heatmap and captioned image grids; any other attribute is
    passed to the raw visdom.Visdom client."""

    def __init__(self, env='default', port=8097, server='http://localhost', record_file=None,
                 **kwargs):
        self.env = env
        self.index = {}  # chart name -> next x
        self.log_text = ''
        self.record_file = record_file
        self.online = server_is_up(server, port)
        if self.online:
            self.vis = visdom.Visdom(server=server, port=port, env=env, raise_exceptions=False,
                                     use_incoming_socket=False, log_to_filename=record_file,
                                     **kwargs)
        else:
            if record_file:
                os.makedirs(os.path.dirname(record_file) or '.', exist_ok=True)
            warnings.warn(
                f'no Visdom server at {server}:{port}; training goes on without live plots. '
                f'Start one with `python -m visdom.server -port {port}`'
                + (f'; plots are recorded to {record_file} '
                   f'(replay: python main.py replay --file={record_file})' if record_file else ''))
            self.vis = visdom.Visdom(env=env, offline=True, log_to_filename=record_file, **kwargs)

    def plot(self, name, y, **kwargs):
        """Append one point to chart `name` (x counts calls)."""
        x = self.index.get(name, 0)
        self.vis.line(Y=np.array([y]), X=np.array([x]), win=name, opts=dict(title=name),
                      update=None if x == 0 else 'append', **kwargs)
        self.index[name] = x + 1

    def plot_many(self, values):
        for name, y in values.items():
            self.plot(name, y)

    def plot_lines(self, name, values, x=None):
        """Append one point to each named line of chart `name`, e.g. train and val."""
        x = self.index.get(name, 0) if x is None else x
        for line, y in values.items():
            self.vis.line(Y=np.array([y]), X=np.array([x]), win=name, name=line,
                          opts=dict(title=name, showlegend=True),
                          update=None if name not in self.index else 'append')
            self.index.setdefault(name, x)
        self.index[name] = x + 1

    def img(self, name, img, **kwargs):
        self.vis.images(img.cpu().numpy(), win=name, opts=dict(title=name), **kwargs)

    def img_many(self, images):
        for name, img in images.items():
            self.img(name, img)

    def img_grid(self, name, images, captions, nrow=8):
        """A grid of images (N,3,H,W in [0,1]) with one caption per image."""
        caption = ' | '.join(f'{i}:{c}' for i, c in enumerate(captions))
        self.vis.images(images.cpu().numpy(), nrow=nrow, win=name,
                        opts=dict(title=name, caption=caption))

    def confusion(self, name, matrix, labels=('cat', 'dog')):
        """Heatmap of a confusion matrix: rows = true class, columns = predicted."""
        self.vis.heatmap(np.asarray(matrix, dtype=float)[::-1], win=name, opts=dict(
            title=name, columnnames=[f'pred {c}' for c in labels],
            rownames=[f'true {c}' for c in reversed(labels)]))

    def log(self, info, win='log'):
        """Add a timestamped line to an accumulating text pane."""
        self.log_text += f'[{time.strftime("%m-%d %H:%M:%S")}] {info}<br>'
        self.vis.text(self.log_text, win=win)

    def __getattr__(self, name):
        if name == 'vis':  # not set: __init__ failed
            raise AttributeError(name)
        return getattr(self.vis, name)
