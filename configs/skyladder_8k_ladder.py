"""SkyLadder experiment, SkyLadder arm: configs/skyladder_8k_baseline.py with the attention window
of every layer scheduled (Zhu et al. 2025, arXiv:2503.15450), nothing else changed.

- linear from start=32 tokens, the paper's schedule and first window;
- chunk (block-wise) masks, as in the paper, intersected with the documents;
- climb_fraction=0.5: the window reaches the full 8192 at half of train.steps, so the second half
  trains (and the learning rate decays) at the full length the model is evaluated at. The
  paper's rate of 1/8 token per step would need ~65K steps to climb to 8K; these runs have a few
  hundred, so the climb is set as a share of the run instead;
- multiple_of=128: the Hopper kernel works on 128-token query and key tiles, so windows that are
  multiples of 128 put every chunk boundary on a tile boundary and each tile is either fully
  visible or skipped (no partially masked tiles besides the diagonal and document edges). The
  staircase is at most 127 tokens (1.6% of 8K) below the exact linear climb; windows under 128
  stay at the start value, 32, for the first few steps.
"""
from configs import skyladder_8k_baseline


def get_config():
    config = skyladder_8k_baseline.get_config()
    sky = config.skyladder
    sky.enabled = True
    sky.kind = "linear"
    sky.start = 32
    sky.climb_fraction = 0.5
    sky.multiple_of = 128
    sky.mask = "chunk"
    return config
