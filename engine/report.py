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
    alarm = collapse_warning(history)
    if alarm:
        print(f'!!! {alarm}')
        warnings.warn(alarm)
        if vis is not None:
            vis.log(f'WARNING: {alarm}')


def collapse_warning(history, one_class=0.95, balanced=0.3, near=0.01, band=3.0):
    """After a validation pass, from the epoch records (epoch_record): a message when the
    run shows a stuck-at-50% symptom, else None. Symptoms: validation predictions nearly
    all one class while the labels are balanced; a training loss at or above ln 2 that
    did not fall over two epochs; training accuracy within `band` points of 50% for two
    epochs on balanced labels."""
    recent = history[-2:]
    symptoms = (one_class_symptom(history[-1]['val_cm'], one_class, balanced)
                + loss_symptom([r['loss'] for r in recent], near)
                + accuracy_symptom(recent, band, balanced))
    if not symptoms:
        return None
    return ('the run looks stuck at 50%: ' + '; '.join(symptoms) + '. Run `python main.py '
            'doctor` with the same options to find the cause.')


def class_shares(cm):
    """(true class shares, predicted class shares) of a confusion matrix, or None."""
    cm = np.asarray(cm, dtype=float)
    return (cm.sum(1) / cm.sum(), cm.sum(0) / cm.sum()) if cm.sum() > 0 else None


def one_class_symptom(val_cm, one_class, balanced):
    shares = class_shares(val_cm)
    if shares is None or shares[0].min() < balanced or shares[1].max() < one_class:
        return []
    truth, predicted = shares
    labels = ' / '.join(f'{share:.0%} {name}' for share, name in zip(truth, CLASSES))
    return [f'{predicted.max():.0%} of the validation predictions are '
            f'"{CLASSES[int(predicted.argmax())]}" although the labels are {labels} '
            f'(confusion matrix {np.asarray(val_cm).astype(int).tolist()})']


def loss_symptom(losses, near):
    """Two epochs at or above ln 2 (a 50/50 guess or worse), the second no lower."""
    if len(losses) < 2 or not all(loss >= LN2 - near for loss in losses):
        return []
    if losses[1] < losses[0] - near:
        return []
    where = 'stayed at' if all(abs(loss - LN2) <= near for loss in losses) else 'not fallen below'
    return [f'the training loss has {where} ln 2 = {LN2:.3f} for two epochs '
            f'({losses[0]:.4f}, {losses[1]:.4f})']


def accuracy_symptom(records, band, balanced):
    accuracies = [r.get('train_acc_cm') for r in records]
    shares = [class_shares(r['train_cm']) if r.get('train_cm') is not None else None
              for r in records]
    if len(records) < 2 or None in accuracies or any(
            s is None or s[0].min() < balanced for s in shares):
        return []
    if not all(abs(acc - 50) <= band for acc in accuracies):
        return []
    return [f'the training accuracy has stayed within {band:g} points of 50% for two epochs '
            f'({accuracies[0]:.1f}%, {accuracies[1]:.1f}%)']
