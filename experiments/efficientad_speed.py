"""Training speed of the efficientad head before and after the im2col/quantile change, in one process.

    python experiments/efficientad_speed.py D N B [before,conv only,after,after+jitter]

EfficientAD.fit on ELPV-sized random inputs: N images 256 x 256 x 3, stride-8 teacher targets
32 x 32 x D, batch B, 2 distillation + 2 student/autoencoder epochs; prints ms per step of each
phase's second epoch (compilation excluded). "before" swaps in the code of commit 3f501a5
(convolution patches from lax.conv_general_dilated_patches, hard-feature quantile from a top-k).
"after+jitter" is "after" with the autoencoder's colour jitter on (ae_jitter=0.2): the teacher and
the student run once more per step, on the jittered copy.
"""
import argparse
import math
import time

import jax
import numpy as np

from anomax.heads import _pdn, efficientad
from anomax.heads.efficientad import EfficientAD
from anomax.preprocess.params import create_dl_preprocess_param
from anomax.training import TrainConfig


def old_conv(self, x):  # anomax/heads/_pdn.py at 3f501a5
    if self.size == 1 and self.stride == 1:
        return x @ self.kernel[...][0, 0] + self.bias[...]
    patches = jax.lax.conv_general_dilated_patches(x, (self.size, self.size), (self.stride, self.stride), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    kernel = self.kernel[...]
    return patches @ kernel.transpose(2, 0, 1, 3).reshape(-1, kernel.shape[-1]) + self.bias[...]


def old_quantile(values, q):  # anomax/heads/efficientad.py at 3f501a5
    flat = values.reshape(-1)
    position = q * (flat.size - 1)
    low = math.floor(position)
    high = min(low + 1, flat.size - 1)
    top = jax.lax.top_k(flat, flat.size - low)[0]
    below, above = top[flat.size - 1 - low], top[flat.size - 1 - high]
    return below + (position - low) * (above - below)


new_conv, new_quantile = _pdn.Conv.__call__, efficientad.quantile
VARIANTS = {"before": (old_conv, old_quantile, 0.0), "conv only": (new_conv, old_quantile, 0.0),
            "after": (new_conv, new_quantile, 0.0), "after+jitter": (new_conv, new_quantile, 0.2)}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("D", type=int, help="the teacher's output channels")
parser.add_argument("N", type=int, help="training images")
parser.add_argument("B", type=int, help="batch size")
parser.add_argument("variants", nargs="?", default=",".join(VARIANTS), help=f"comma-separated, of {list(VARIANTS)}")
arguments = parser.parse_args()
D, N, B = arguments.D, arguments.N, arguments.B
names = arguments.variants.split(",")
unknown = sorted(set(names) - set(VARIANTS))
if unknown:
    parser.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
rng = np.random.default_rng(0)
images = rng.normal(size=(N, 256, 256, 3)).astype(np.float32)
features = rng.normal(size=(N, 32, 32, D)).astype(np.float32)
batches = [{"image": images[i:i + 8], "features": features[i:i + 8]} for i in range(0, N, 8)]
train = TrainConfig(max_num_epochs=2, batch_size=B, error_threshold=0.0)
for name in names:
    _pdn.Conv.__call__, efficientad.quantile, jitter = VARIANTS[name]
    head = EfficientAD(EfficientAD.Config(width=16, ae_width=16, distill_epochs=2, ae_jitter=jitter))
    t = time.perf_counter()
    info = head.fit(batches, train=train, validation=[{"image": images[:8]}],
                    preprocess=create_dl_preprocess_param(width=256, height=256))
    steps = -(-N // B)
    d, s = info["distillation"]["log"][-1]["seconds"], info["log"][-1]["seconds"]
    compile_s = info["distillation"]["compile_seconds"], info["compile_seconds"]
    print(f"D={D} B={B} {name:10s}: distil {1000 * d / steps:7.0f} ms/step, student+AE {1000 * s / steps:7.0f} ms/step "
          f"(epoch of {N}: {d:.1f} s / {s:.1f} s), compile {compile_s[0]:.0f}+{compile_s[1]:.0f} s, "
          f"best_error {info['best_error']:.6f}, fit {time.perf_counter() - t:.0f} s", flush=True)
