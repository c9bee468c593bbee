"""Wall time to 80/85/90/92/93% validation accuracy on the shared Kaggle images.

    python bench/time_to_accuracy.py --recipe=cpu        # SmallResNet, 96 px, preloaded
    python bench/time_to_accuracy.py --recipe=pretrained # EfficientNetLite1And2, frozen, cached
    python bench/time_to_accuracy.py --recipe=book --minutes=20 # capped: where did it get?

Each recipe (config.RECIPES) trains through `main.train` (the project's own loop, meters, checkpoints)
on ../shared/data/dogcat/train with the seeded 70/30 split; the clock starts before
the data is listed, so decoding and set-up count. Prints a markdown row per recipe.
With --minutes the run gets SIGTERM at the cap (it saves its place, as on any
SIGTERM) and the saved weights are then evaluated on the validation split.
"""
import os
import signal
import sys
import threading
import time

import fire

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import main  # noqa: E402
from bench.shared import SHARED_TRAIN  # noqa: E402

THRESHOLDS = (80, 85, 90, 92, 93)


def run(recipe='cpu', data=SHARED_TRAIN, minutes=None, **overrides):
    options = dict(vis=False, checkpoint_dir=f'/tmp/tta_{recipe}', train_data_root=data)
    options.update(recipe=recipe, **overrides)
    start = time.time()
    cap = threading.Timer(minutes * 60, os.kill, (os.getpid(), signal.SIGTERM)) if minutes else None
    if cap:
        cap.start()
    try:
        history = main.train(**options).history
    except SystemExit:  # the cap: evaluate what the run saved
        return report_capped(recipe, options, start)
    finally:
        if cap:
            cap.cancel()
    crossed = {t: next(((r['time'] - start) / 60 for r in history if r['val_acc_cm'] >= t), None)
               for t in THRESHOLDS}
    last = history[-1]
    cells = ' | '.join(f'{m:.1f}' if m is not None else '-' for m in crossed.values())
    print(f'| {recipe} | {cells} | {last["val_acc_cm"]:.2f} | {last["val_log_loss"]:.3f} | '
          f'{(time.time() - start) / 60:.1f} |')
    return crossed


def report_capped(recipe, options, start):
    stopped = (time.time() - start) / 60
    model = config.parse(options, verbose=False).model
    last = os.path.join(options['checkpoint_dir'], f'{model}_last.pth')
    meter = main.val(**dict(options, load_model_path=last))
    print(f'| {recipe}, stopped at the cap (see {last}) | {" | ".join(["-"] * len(THRESHOLDS))} | '
          f'{meter.accuracy_cm:.2f} | {meter.log_loss:.3f} | {stopped:.1f} |')


if __name__ == '__main__':
    print('| recipe | min to 80% | 85% | 90% | 92% | 93% | final val acc % | log loss | total min |')
    print('|---|---|---|---|---|---|---|---|---|')
    fire.Fire(run, serialize=lambda result: None)
