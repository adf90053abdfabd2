"""Every knob of a ctxjax run, documented once. Experiments import this and change a few values:

    from configs import base
    def get_config():
        config = base.get_config()
        config.model.d_model = 1024
        return config
"""
import ml_collections

from ctxjax.data import default_data_config
from ctxjax.model import default_model_config
from ctxjax.schedules import default_optim_config, default_skyladder_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.model = default_model_config()  # architecture, RoPE, attention pattern, remat, dtypes
    config.data = default_data_config()  # sources, tokenizer, packing, positions, curriculum
    config.optim = default_optim_config()  # AdamW, LR schedule, clipping, accumulation, z-loss
    config.skyladder = default_skyladder_config()  # context-window schedule (off by default)

    # Device mesh: the product must equal the number of devices; one axis may be -1 (the rest).
    config.mesh = ml_collections.ConfigDict(dict(
        data=1, fsdp=-1, tensor=1, context=1,
        dcn_data=1, dcn_fsdp=1,  # multi-slice pods: slices along data / fsdp over DCN
    ))

    config.train = ml_collections.ConfigDict(dict(
        seq_len=512,  # packed row length L (a data curriculum may override per stage)
        global_batch_size=8,  # rows per optimizer step, across all hosts
        steps=1000,  # optimizer steps
        seed=0,
        vocab_chunk=8192,  # vocabulary chunk of the cross-entropy (memory vs. speed)
        log_every=10,  # steps between metrics lines (metrics.jsonl, TensorBoard, progress bar)
        peak_tflops=0.0,  # per-device peak for MFU; 0 = look it up from the device kind
        plot=True,  # write loss/window PNG at the end
        distributed=False,  # call jax.distributed.initialize (pods, multi-node GPU)
    ))

    config.checkpoint = ml_collections.ConfigDict(dict(
        every=500,  # steps between saves (and always at the end)
        keep=3,  # checkpoints kept
        async_save=True,
        init_from="",  # a ctxjax workdir (or checkpoint dir) to start from: params only (extension)
        init_step=-1,  # its step to load; -1 = latest
    ))

    config.eval = ml_collections.ConfigDict(dict(
        every=0,  # steps between validation losses; 0 = only at the end
        batches=4,
        batch_size=4,
        seq_len=0,  # 0 = train.seq_len
    ))
    return config
