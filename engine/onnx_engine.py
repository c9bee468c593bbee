"""ONNX: export a trained network, and run it in ONNX Runtime where that is faster.

One code path for `export`, `predict --engine=onnx` and --engine=onnx|auto in val, test
and the frozen-backbone feature cache. The network goes through torch.onnx.export's
torch.export-based exporter (PyTorch's default since 2.9; the TorchScript one is
deprecated and gave wrong EfficientNet outputs here), with a dynamic batch size and its
input contract in the file's metadata_props. Commands ask for_inference(run) for the
network to call: the torch model itself, or an OnnxNetwork, which is called like it
(images -> fp32 logits) and also gives the backbone's features (second output).
"""
import copy
import importlib.util
import json
import os
import time

import torch
from torch import nn

from engine.tta import with_tta
from utils import distributed
from utils.errors import UserError

ENGINES = ('torch', 'onnx', 'auto')
MIN_SPEEDUP = 1.3  # auto takes ONNX Runtime only when it is at least this much faster
# auto never exports for fewer images: the export and the measurement cost 5-20 s,
# more than ONNX Runtime can save on a small set
AUTO_MIN_IMAGES = 1000
CHOICE_FILE = 'engine_choice.json'  # auto's measurements, in the checkpoint dir
INPUT, LOGITS, FEATURES = 'images', 'logits', 'features'
INPUT_FORMAT = ('float32 NCHW, RGB; each image resized (shorter side) to image_size, '
                'centre-cropped to image_size x image_size, scaled to [0, 1], then '
                '(x - input_mean) / input_std per channel')
OUTPUTS = ('logits [N, 2] (softmax: P(cat), P(dog)); features [N, F], the input of the '
           'classifier (pretrained models only)')


class OnnxError(UserError):
    pass


def available():
    return importlib.util.find_spec('onnxruntime') is not None


class WithFeatures(nn.Module):
    """The model returning (logits, the head's input): the feature cache's second output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        captured = []
        hook = self.model.head().register_forward_pre_hook(
            lambda module, args: captured.append(args[0]))
        try:
            logits = self.model(images)
        finally:
            hook.remove()
        return logits, captured[0]


def contract(model, image_size, source):
    """The metadata_props of an exported file: what its input must be."""
    return {'model': model.model_name, 'image_size': str(image_size),
            'input_mean': json.dumps(list(model.input_mean)),
            'input_std': json.dumps(list(model.input_std)),
            'input_format': INPUT_FORMAT, 'classes': 'cat,dog', 'outputs': OUTPUTS,
            'temperature': f'{model.temperature:g} (the logits are already divided by it)',
            'source': source or '', 'exported_by': 'dogcat: python main.py export'}


def export_bytes(model, image_size, source=''):
    """The serialised ONNX model of `model` (left untouched: a copy is exported)."""
    if not importlib.util.find_spec('onnxscript'):
        raise OnnxError('exporting to ONNX needs onnxscript (torch.onnx.export uses it): '
                        'pip install -r requirements.txt')
    net = copy.deepcopy(model).cpu().to(memory_format=torch.contiguous_format).eval()
    has_head = net.head() is not None
    example = torch.zeros(2, 3, image_size, image_size)  # torch.export specialises a batch of 1
    try:
        with torch.random.fork_rng(devices=[]):  # training after a feature cache: same RNG
            program = torch.onnx.export(
                WithFeatures(net).eval() if has_head else net, (example,), dynamo=True,
                verbose=False, input_names=[INPUT], external_data=False,
                output_names=[LOGITS, FEATURES] if has_head else [LOGITS],
                dynamic_shapes=({0: torch.export.Dim('batch')},))
    except Exception as exc:  # the exporter raises many kinds; one line says which
        raise OnnxError(f'torch.onnx.export could not export {model.model_name}: '
                        f'{first_line(exc)}') from exc
    program.model.metadata_props.update(contract(model, image_size, source))
    return program.model_proto.SerializeToString()


def export_file(model, image_size, path, source=''):
    """Write the ONNX model to `path` through a temporary file and a rename."""
    blob = export_bytes(model, image_size, source)
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'wb') as f:
        f.write(blob)
    os.replace(tmp, path)
    return path


class OnnxNetwork:
    """An exported network in an ONNX Runtime session (CPU), called like the torch
    model: images (a float tensor, any memory format) -> fp32 logits."""

    def __init__(self, source, name=None, threads=None):
        if not available():
            raise OnnxError('--engine=onnx needs onnxruntime: pip install -r requirements.txt')
        import onnxruntime as ort
        self.name = name or source
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        # no busy-waiting between batches: the data-loading workers need those cores
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        # no memory pattern: it plans one block per batch size seen (the last batch of an
        # epoch differs) and the arena keeps them all; off, the peak stays that of one
        # batch (EfficientNetLite1And2 at 260 px: 7.2 GB -> 4.3 GB), at the same speed
        options.enable_mem_pattern = False
        try:
            self.session = ort.InferenceSession(source, options,
                                                providers=['CPUExecutionProvider'])
        except Exception as exc:  # InvalidProtobuf, Fail, NoSuchFile...: all one line
            raise OnnxError(f'{self.name!r} is not an ONNX model ONNX Runtime can load: '
                            f'{first_line(exc)}') from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = [k for k in ('model', 'image_size', 'input_mean', 'input_std') if k not in meta]
        if missing or LOGITS not in self.outputs:
            raise OnnxError(f'{self.name!r} is an ONNX model, but not one `python main.py '
                            f'export` wrote (no {", ".join(missing) or "logits output"} in it)')
        self.model_name, self.image_size = meta['model'], int(meta['image_size'])
        self.input_mean = tuple(json.loads(meta['input_mean']))
        self.input_std = tuple(json.loads(meta['input_std']))

    @classmethod
    def of(cls, model, image_size, source=''):
        return cls(export_bytes(model, image_size, source), name=f'{model.model_name} (exported)')

    def eval(self):  # evaluate() calls model.eval(): nothing to switch here
        return self

    def __call__(self, images):
        return self.run(images)[self.outputs.index(LOGITS)]

    def features(self, images):
        return self.run(images)[self.outputs.index(FEATURES)]

    def run(self, images):
        array = images.detach().float().cpu().contiguous().numpy()
        if array.shape[1:] != (3, self.image_size, self.image_size):
            raise OnnxError(f'{self.name} takes 3 x {self.image_size} x {self.image_size} '
                            f'images, not {" x ".join(map(str, array.shape[1:]))}: pass '
                            f'--image_size={self.image_size}')
        return [torch.from_numpy(out) for out in self.session.run(None, {INPUT: array})]


def first_line(exc):
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def for_inference(run, images=None):
    """What val and test call: run.model, or an OnnxNetwork of it (--engine), with
    --tta's augmentation around it."""
    count = len(run.val_data) if images is None else images
    return with_tta(choose(run.opt, run.model, run.placement, count), run.opt.tta)


def choose(opt, model, placement, images):
    """--engine=torch: model; onnx: its OnnxNetwork; auto: the OnnxNetwork when ONNX
    Runtime runs `model` at least MIN_SPEEDUP x faster than torch here (measured
    once, remembered in <checkpoint_dir>/engine_choice.json), else model."""
    if opt.engine == 'torch':
        return model
    if opt.engine == 'onnx':
        if not available():  # before a long export
            raise OnnxError('--engine=onnx needs onnxruntime: pip install -r requirements.txt')
        return OnnxNetwork.of(model, opt.image_size)
    if (not available() or placement.device.type != 'cpu' or distributed.world_size() > 1
            or images < AUTO_MIN_IMAGES):
        return model  # GPU, torchrun (each rank would export) or too few images
    key = choice_key(model.model_name, opt.image_size, placement.bf16)
    remembered = read_choices(opt.checkpoint_dir).get(key)
    if not isinstance(remembered, dict) or remembered.get('engine') not in ('torch', 'onnx'):
        remembered = None
    if remembered and remembered['engine'] == 'torch':
        announce(remembered, model.model_name, opt)
        return model
    try:
        network = OnnxNetwork.of(model, opt.image_size)
    except OnnxError as exc:
        print(f'engine: torch ({exc})')
        return model
    if not remembered:
        torch_rate, onnx_rate = measure(model, network, placement, opt.batch_size, opt.image_size)
        engine = 'onnx' if onnx_rate >= MIN_SPEEDUP * torch_rate else 'torch'
        remembered = dict(engine=engine, torch_img_s=round(torch_rate, 1),
                          onnx_img_s=round(onnx_rate, 1))
        write_choice(opt.checkpoint_dir, key, remembered)
    announce(remembered, model.model_name, opt)
    return network if remembered['engine'] == 'onnx' else model


def announce(choice, model_name, opt):
    if distributed.is_main():
        print(f'engine: {choice["engine"]} (ONNX Runtime {choice.get("onnx_img_s")} img/s, '
              f'torch {choice.get("torch_img_s")} img/s for {model_name} at {opt.image_size} px '
              f'here; ONNX Runtime from {MIN_SPEEDUP}x; measured once, remembered in '
              f'{os.path.join(opt.checkpoint_dir, CHOICE_FILE)}; --engine=torch|onnx overrides)')


def choice_key(model_name, image_size, bf16):
    import onnxruntime
    return (f'{model_name} {image_size} px, {torch.get_num_threads()} threads, '
            f'bf16 {bool(bf16)}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__}')


@torch.inference_mode()
def measure(model, network, placement, batch_size, image_size, repeats=2):
    """(torch img/s, ONNX Runtime img/s) on one random batch: a warm-up, then the best
    of `repeats` runs each (the best, as other jobs on the machine only slow a run)."""
    # its own generator: the run's random stream stays as without the measurement
    batch = torch.randn(min(batch_size, 32), 3, image_size, image_size,
                        generator=torch.Generator().manual_seed(0))
    model.eval()
    rates = []
    for forward in (lambda: placement.forward(model, batch), lambda: network(batch)):
        forward()
        best = float('inf')
        for _ in range(repeats):
            start = time.perf_counter()
            forward()
            best = min(best, time.perf_counter() - start)
        rates.append(len(batch) / best)
    return tuple(rates)


def read_choices(folder):
    try:
        with open(os.path.join(folder, CHOICE_FILE)) as f:
            choices = json.load(f)
        return choices if isinstance(choices, dict) else {}
    except (OSError, ValueError):
        return {}


def write_choice(folder, key, choice):
    """Remember a measurement; a read-only or missing folder only costs a new one."""
    choices = dict(read_choices(folder), **{key: choice})
    path = os.path.join(folder, CHOICE_FILE)
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
        os.makedirs(folder, exist_ok=True)
        with open(tmp, 'w') as f:
            json.dump(choices, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
