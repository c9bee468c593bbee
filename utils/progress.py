"""Progress of long phases (decoding, feature cache, epochs, validation, test).

In a terminal: a tqdm bar with rate and ETA. In a log file or a pipe: a plain line at
most every `every` seconds (no carriage-return spam), so nobody watches a silent log.
Only torchrun's rank 0 reports.
"""
import sys
import time

from tqdm import tqdm

from utils import distributed

EVERY = 10.0  # seconds between two plain progress lines


class Progress:
    """An iterable wrapper: `for x in Progress(loader, 'epoch 3'): ...`, and
    `.note(loss=...)` to show running figures."""

    def __init__(self, iterable, desc, total=None, unit='batches', every=None, stream=None):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.every = EVERY if every is None else every
        self.total = total if total is not None else _length(iterable)
        self.stream = stream or sys.stderr
        self.enabled = distributed.is_main()
        self.bar = None
        if self.enabled and _is_terminal(self.stream):
            self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False,
                            dynamic_ncols=True, file=self.stream)
        self.figures = {}
        self.done = 0

    def note(self, **figures):
        self.figures = figures
        if self.bar is not None:
            self.bar.set_postfix(figures, refresh=False)

    def __iter__(self):
        start = last = time.monotonic()
        try:
            for item in self.iterable:
                yield item
                self.done += 1
                if self.bar is not None:
                    self.bar.update(1)
                elif self.enabled and time.monotonic() - last >= self.every:
                    last = time.monotonic()
                    self._line(last - start)
        finally:
            if self.bar is not None:
                self.bar.close()

    def _line(self, elapsed):
        rate = self.done / max(elapsed, 1e-9)
        where = f'{self.done}/{self.total}' if self.total else f'{self.done}'
        eta = (f', ETA {_clock((self.total - self.done) / rate)}'
               if self.total and rate > 0 else '')
        extra = ''.join(f', {k} {v}' for k, v in self.figures.items())
        print(f'{self.desc}: {where} {self.unit}, {rate:.2f} {self.unit}/s, '
              f'{_clock(elapsed)} elapsed{eta}{extra}', file=self.stream, flush=True)


def _length(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


def _is_terminal(stream):
    return hasattr(stream, 'isatty') and stream.isatty()


def _clock(seconds):
    minutes, seconds = divmod(int(seconds), 60)
    return f'{minutes}:{seconds:02d}'
