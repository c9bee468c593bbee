"""What an epoch tells the user: the book's log line, the Visdom panes, and the
stuck-at-50% alarm."""
import math
import time
import warnings

import numpy as np

from data.dataset import CLASSES

LN2 = math.log(2)  # the loss of a 50/50 guess between two classes


def epoch_record(epoch, lrs, train_meter, val_meter):
    return dict(epoch=epoch, lrs=lrs, loss=train_meter.mean_loss, time=time.time(),
                train_acc_cm=train_meter.accuracy_cm, train_acc_count=train_meter.accuracy_counts,
                train_cm=train_meter.cm.tolist(),
                val_acc_cm=val_meter.accuracy_cm, val_acc_count=val_meter.accuracy_counts,
                val_log_loss=val_meter.log_loss, val_cm=val_meter.cm.tolist())


def format_epoch(record):
    lr = ','.join(f'{lr:.3g}' for lr in record['lrs'])
    return (f'epoch:{record["epoch"]}, lr:{lr}, loss:{record["loss"]:.4f}, '
            f'train_cm:{record["train_cm"]}, val_cm:{record["val_cm"]}, '
            f'train_acc(cm/count):{record["train_acc_cm"]:.2f}/{record["train_acc_count"]:.2f}%, '
            f'val_acc(cm/count):{record["val_acc_cm"]:.2f}/{record["val_acc_count"]:.2f}%, '
            f'val_logloss:{record["val_log_loss"]:.4f}')


def report_epoch(history, lrs, train_meter, val_meter, vis):
    """The epoch's line on stdout and in Visdom, and the stuck-at-50% alarm."""
    line = format_epoch(history[-1])
    print(line)
    if vis is not None:
        vis.plot_lines('accuracy', {'train (cm)': train_meter.accuracy_cm,
                                    'train (count)': train_meter.accuracy_counts,
                                    'val (cm)': val_meter.accuracy_cm,
                                    'val (count)': val_meter.accuracy_counts})
        vis.plot('lr', lrs[0], ytype='log')
        vis.plot('val log loss', val_meter.log_loss)
        vis.confusion('val confusion matrix', val_meter.cm)
        vis.log(line)
    alarm = collapse_warning([record['loss'] for record in history], val_meter.cm)
    if alarm:
        print(f'!!! {alarm}')
        warnings.warn(alarm)
        if vis is not None:
            vis.log(f'WARNING: {alarm}')


def collapse_warning(train_losses, val_cm, one_class=0.95, balanced=0.3, near=0.01):
    """After a validation pass: a message when the run shows the stuck-at-50% symptoms
    (predictions nearly all one class while the labels are balanced, or the training loss
    at ln 2 for two epochs), else None."""
    cm = np.asarray(val_cm, dtype=float)
    symptoms = []
    if cm.sum() > 0:
        truth, predicted = cm.sum(1) / cm.sum(), cm.sum(0) / cm.sum()
        if truth.min() >= balanced and predicted.max() >= one_class:
            labels = ' / '.join(f'{share:.0%} {name}' for share, name in zip(truth, CLASSES))
            symptoms.append(f'{predicted.max():.0%} of the validation predictions are '
                            f'"{CLASSES[int(predicted.argmax())]}" although the labels are '
                            f'{labels} (confusion matrix {cm.astype(int).tolist()})')
    recent = list(train_losses)[-2:]
    if len(recent) == 2 and all(abs(loss - LN2) <= near for loss in recent):
        symptoms.append(f'the training loss has stayed at ln 2 = {LN2:.3f} for two epochs '
                        f'({recent[0]:.4f}, {recent[1]:.4f})')
    if not symptoms:
        return None
    return ('the run looks stuck at 50%: ' + '; '.join(symptoms) + '. Run `python main.py '
            'doctor` with the same options to find the cause.')
