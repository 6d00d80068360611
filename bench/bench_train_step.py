"""Time one training step (forward + backward + SGD) of each backbone at 112×112.

Model: ``build_model(backbone)`` (512-D ``bn_dropout_fc_bn`` head) + a 1000-class
linear classifier and cross-entropy, SGD (momentum 0.9, weight decay 5e-4), random
inputs. Prints milliseconds per step, per image and images per second, on the CPU
(``torch.set_num_threads(os.cpu_count())`` unless ``--threads``) and, when CUDA is
available, on the GPU as the trainer runs it: the backbone under autocast (``--amp
auto``: bf16 from compute capability 8.0 on, fp16 with a grad scaler before; or
``bf16``/``fp16``/``off``), the head and the loss in fp32, channels_last
(``--no-channels-last`` to compare), cuDNN autotuning on. ``--devices cuda`` on a
machine where torch sees no GPU prints why and skips it.

With ``--shards DIR`` it also runs the real trainer (``pipeline.train.train``, the
loss from ``--loss``, params.yaml's model and train sections) on those shards for a
few hundred steps and compares its time per step with the bare step above on the
same backbone and batch, in the same process: the difference is the share of step time
spent outside forward/backward/SGD (data wait, the margin loss, NaN checks, logging).

    python bench/bench_train_step.py
    python bench/bench_train_step.py --backbones smallcnn resnet18 --batch-size 32 --steps 5
    python bench/bench_train_step.py --backbones smallcnn --shards data/shards --loss arcface
    python bench/bench_train_step.py --devices cuda --backbones resnet50 iresnet50 --amp bf16 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.models import available_backbones, build_model, count_parameters  # noqa: E402
from pipeline.train import TrainingError, amp_dtype_for, describe_device, pick_device  # noqa: E402

DEFAULT_BACKBONES = ["smallcnn", "resnet18", "resnet34", "resnet50", "iresnet50"]
CPU_BATCH = {"smallcnn": 64, "resnet18": 64, "resnet34": 32, "resnet50": 16}
CUDA_BATCH = {"smallcnn": 256, "resnet18": 256}


def _time_steps(
    backbone: str, device: torch.device, batch: int, steps: int, warmup: int, amp_dtype: torch.dtype | None,
    channels_last: bool, input_size: int, classes: int, embedding_size: int = 512, head: str = "bn_dropout_fc_bn",
) -> tuple[list[float], int]:
    """(seconds per step for ``steps`` timed steps after ``warmup`` ones, model parameters)."""
    torch.manual_seed(0)
    model = build_model(backbone, input_size=input_size, embedding_size=embedding_size, head=head).to(device).train()
    classifier = nn.Linear(model.embedding_size, classes).to(device)
    params = [*model.parameters(), *classifier.parameters()]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(batch, 3, input_size, input_size, device=device) * 2 - 1
    y = torch.randint(0, classes, (batch,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and amp_dtype == torch.float16)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            embeddings = model(x)  # the model's head runs in fp32 inside
        loss = nn.functional.cross_entropy(classifier(embeddings.float()), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times, count_parameters(model)


def pipeline_overhead(shards: Path, loss: str, params_file: Path, steps: int, threads: int) -> None:
    """Real trainer vs bare step on the same backbone and batch; prints the overhead share."""
    from pipeline.config import load_params
    from pipeline.train import TrainSetup, train

    params = load_params(params_file, check_paths=False)
    train_params = params.train.model_copy(update={"epochs": 2, "max_steps_per_epoch": steps, "warmup_epochs": 0})
    setup = TrainSetup(loss_name=loss, loss_params=params.loss_params(loss), model=params.model,
                       train=train_params, seed=params.seeds.train[0], image_size=params.align.size,
                       data_seed=params.seeds.data)
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        metrics = train(setup, shards, tmp / "model", tmp / "ckpt", tmp / "report", progress=False)
        timing = json.loads((tmp / "report" / "timing.json").read_text())
    n_steps = metrics["steps"]
    identities = metrics["identities"]
    step_s = (timing["step_seconds_data"] + timing["step_seconds_compute"]) / n_steps
    data_s = timing["step_seconds_data"] / n_steps
    loop_s = timing["seconds_this_run"] / n_steps
    bare, _ = _time_steps(params.model.backbone, torch.device("cpu"), params.train.batch_size, steps=20, warmup=3,
                          amp_dtype=None, channels_last=False, input_size=params.align.size, classes=identities,
                          embedding_size=params.model.embedding_size, head=params.model.head)
    bare_s = statistics.median(bare)
    print(f"\ntrainer on {shards} ({loss}, {params.model.backbone}, batch {params.train.batch_size}, "
          f"{identities} identities, {n_steps} steps in 2 epochs):")
    print(f"  bare forward/backward/SGD step (same model, {params.model.embedding_size}-D, softmax head) {bare_s * 1e3:8.1f} ms")
    print(f"  trainer step (data + loss + logging) {step_s * 1e3:8.1f} ms   of which data wait {data_s * 1e3:.1f} ms")
    print(f"  trainer loop incl. validation/ckpt   {loop_s * 1e3:8.1f} ms")
    print(f"  overhead outside forward/backward: {100 * (1 - bare_s / step_s):.1f}% of step time "
          f"(data wait alone {100 * data_s / step_s:.1f}%); "
          f"{100 * (1 - bare_s / loop_s):.1f}% including per-epoch validation and checkpoints")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=DEFAULT_BACKBONES, choices=available_backbones())
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch for every backbone (default: 64 smallcnn/resnet18, 32 resnet34, 16 others on CPU)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU intra-op threads")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    parser.add_argument("--cpu-channels-last", action="store_true", help="also use channels_last on CPU")
    parser.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                        help="GPU autocast dtype (auto: bf16 from compute capability 8.0, else fp16); "
                             "CPU runs are fp32 unless bf16 is asked for")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                        help="channels_last on the GPU (default on, as the trainer)")
    parser.add_argument("--shards", type=Path, help="also time the real trainer on these shards (shards dir)")
    parser.add_argument("--loss", default="arcface", help="loss for --shards")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file for --shards")
    parser.add_argument("--trainer-steps", type=int, default=100, help="steps per epoch for --shards (2 epochs)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    devices = []
    for name in args.devices:
        if name == "cuda":
            try:
                devices.append(str(pick_device("cuda", key="device")))
            except TrainingError as err:
                print(f"skipping cuda: {err}")
        else:
            devices.append(name)
    print(f"torch {torch.__version__}, CPU threads {torch.get_num_threads()} (os.cpu_count()={os.cpu_count()}), "
          f"CUDA: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    print(f"input {args.input_size}x{args.input_size}, {args.steps} timed steps after {args.warmup} warm-up, "
          f"median reported")
    header = f"{'device':<28} {'backbone':<11} {'params':>7} {'batch':>5} {'ms/step':>9} {'ms/img':>7} {'img/s':>8}"
    print(header)
    print("-" * len(header))
    for device_name in devices:
        device = torch.device(device_name)
        cuda = device.type == "cuda"
        if cuda:
            torch.backends.cudnn.benchmark = True  # as the trainer: fixed input size
            capability = tuple(torch.cuda.get_device_capability(device))
            amp_dtype = {"auto": amp_dtype_for("cuda", capability, True), "bf16": torch.bfloat16,
                         "fp16": torch.float16, "off": None}[args.amp]
            channels_last = args.channels_last
            print(describe_device(device, amp_dtype, 1))
        else:
            amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
            channels_last = args.cpu_channels_last
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp_dtype]
        label = f"{device.type} {precision}" + (" channels_last" if channels_last else "")
        for backbone in args.backbones:
            table = CUDA_BATCH if cuda else CPU_BATCH
            batch = args.batch_size or table.get(backbone, 128 if cuda else 16)
            times, params = _time_steps(
                backbone, device, batch, args.steps, args.warmup, amp_dtype=amp_dtype,
                channels_last=channels_last, input_size=args.input_size, classes=args.classes,
            )
            sec = statistics.median(times)
            print(f"{label:<28} {backbone:<11} {params / 1e6:>6.1f}M {batch:>5} {sec * 1e3:>9.1f} "
                  f"{sec * 1e3 / batch:>7.2f} {batch / sec:>8.1f}", flush=True)
    if args.shards:
        pipeline_overhead(args.shards, args.loss, args.params, args.trainer_steps, args.threads)


if __name__ == "__main__":
    main()
