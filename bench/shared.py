"""Where the shared Kaggle photos are, and small linked subsets of them (the photos
stay where they are; nothing is copied into the repo)."""
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(ROOT, '..', 'shared', 'data', 'dogcat')
SHARED_TRAIN = os.path.join(SHARED_DATA, 'train')


def link_subset(folder, count, start=0):
    """folder/cat.N.jpg and dog.N.jpg for N in [start, start + count // 2): links."""
    os.makedirs(folder)
    for label in ('cat', 'dog'):
        for n in range(start, start + count // 2):
            name = f'{label}.{n}.jpg'
            os.symlink(os.path.join(SHARED_TRAIN, name), os.path.join(folder, name))
    return folder
