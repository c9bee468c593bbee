"""--preload's one-time decoding in forked processes, straight into one shared array.

The processes used to send every decoded image back pickled through a pipe: a quarter to
a third of the phase's CPU time went to the kernel, mostly page faults on the fresh
buffers that each copy (pickle, pipe, unpickle, array) needed. Now each image is written
once, into its slot of an array that the processes share with the parent, and only None
or a small Skipped record crosses the pipe.
"""
import mmap
import multiprocessing
import signal
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from utils.progress import Progress

# In a decoding process: (decode function, shared array), set by init_decoder.
decoder = None


def shared_images(count, size):
    """A zeroed uint8 array (count, 3, size, size) in an anonymous shared mapping, which
    forked processes share with the parent instead of copying on write. Not torch's
    share_memory_(): that one lives in /dev/shm, often only 64 MB in a container."""
    length = count * 3 * size * size
    return np.frombuffer(mmap.mmap(-1, max(length, 1)), np.uint8,
                         length).reshape(count, 3, size, size)


def decode_in_processes(decode, paths, size, processes):
    """decode(path) -> uint8 HWC array (size x size) or a record saying why not, for
    every path in forked processes: (uint8 tensor N x 3 x size x size, [None or the record, per
    path]). A process that dies (killed, out of memory, SIGTERM) breaks the pool and
    that raises BrokenProcessPool at once: a multiprocessing.Pool would start a new
    process and wait forever for the lost work."""
    images = shared_images(len(paths), size)
    pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context('fork'),
                               initializer=init_decoder, initargs=(decode, images))
    try:
        outcomes = pool.map(decode_into_shared, enumerate(paths), chunksize=64)
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


def decode_into_shared(job):
    """(index, path): the pixels into slot index of the shared array, and None back; or
    the decoder's record of why not (a Skipped), sent back as it is."""
    index, path = job
    decode, images = decoder
    pixels = decode(path)
    if not isinstance(pixels, np.ndarray):
        return pixels
    # HWC -> CHW in numpy: a parallel torch op in a forked worker can deadlock in OpenMP
    images[index] = pixels.transpose(2, 0, 1)
    return None
