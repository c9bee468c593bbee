"""--preload's one-time decoding in forked processes, straight into one shared array.

The processes used to send every decoded image back pickled through a pipe: a quarter to
a third of the phase's CPU time went to the kernel, mostly page faults on the fresh
buffers that each copy (pickle, pipe, unpickle, array) needed. Now each image is written
once, into its slot of an array that the processes share with the parent, and only None
or a small Skipped record crosses the pipe. What the kernel still spends is handing out
the array's pages; each process asks for a run of images' pages in one call
(bench/RESULTS.md: 15% less kernel time than one page fault per 4 KB).
"""
import itertools
import mmap
import multiprocessing
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from utils.progress import Progress

# In a decoding process: (decode function, shared array), set by init_decoder.
decoder = None
MADV_POPULATE_WRITE = 23  # Linux >= 5.14; Python 3.11's mmap module does not name it


def shared_images(count, size):
    """A zeroed uint8 array (count, 3, size, size) in an anonymous shared mapping, which
    forked processes share with the parent instead of copying on write. Not torch's
    share_memory_(): that one lives in /dev/shm, often only 64 MB in a container."""
    memory = mmap.mmap(-1, max(count * 3 * size * size, 1))
    return np.ndarray((count, 3, size, size), np.uint8, buffer=memory)


def decode_in_processes(decode, paths, size, processes):
    """decode(path) -> uint8 HWC array (size x size) or a record saying why not, for
    every path in forked processes: (uint8 tensor N x 3 x size x size, [None or the
    record, per path]). A process that dies (killed, out of memory, SIGTERM) breaks the
    pool and that raises BrokenProcessPool at once: a multiprocessing.Pool would start a
    new process and wait forever for the lost work."""
    images = shared_images(len(paths), size)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context('fork'),
                               initializer=init_decoder, initargs=(decode, images))
    # runs of up to 256 images, at least 4 per process so that the last ones even out
    run = max(1, min(256, len(paths) // (4 * processes)))
    runs = [(start, paths[start:start + run]) for start in range(0, len(paths), run)]
    try:
        outcomes = itertools.chain.from_iterable(pool.map(decode_run, runs))
        outcomes = list(Progress(outcomes, 'decoding (--preload)', total=len(paths),
                                 unit='images'))
    finally:
        # after an error or a second Ctrl-C, drop the queued work instead of finishing it
        pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(images), outcomes


def init_decoder(decode, images):
    """A forked decoding process: what to decode with and into, one torch thread (a
    child must not start OpenMP teams of its own: it can deadlock), Ctrl-C left to the
    main process, and the default SIGTERM, with which the pool stops it (not the
    training's save-and-exit handler)."""
    global decoder
    decoder = decode, images
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def decode_run(job):
    """(first index, paths): their pixels into their slots of the shared array, and for
    each None or the decoder's record of why not (a Skipped), sent back as it is."""
    first, paths = job
    decode, images = decoder
    fault_in(images, first, len(paths))
    return [write_pixels(decode(path), images, first + offset)
            for offset, path in enumerate(paths)]


def fault_in(images, first, count):
    """Ask the kernel for the pages under images[first:first + count] of the shared
    array in one call, instead of one page fault per 4 KB as they are written. Where the
    kernel cannot (before Linux 5.14, other systems), the writes fault them in."""
    if not sys.platform.startswith('linux'):
        return
    begin, length = first * images[0].nbytes, count * images[0].nbytes
    page = begin // mmap.PAGESIZE * mmap.PAGESIZE
    try:
        images.base.madvise(MADV_POPULATE_WRITE, page, begin + length - page)
    except OSError:
        pass


def write_pixels(pixels, images, index):
    if not isinstance(pixels, np.ndarray):
        return pixels
    # HWC -> CHW in numpy: a parallel torch op in a forked worker can deadlock in OpenMP
    images[index] = pixels.transpose(2, 0, 1)
    return None
