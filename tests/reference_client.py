"""A client of fastjepa's twins of the reference's modules, written the way the reference's
``src/train.py``, ``main.py`` and ``main_distributed.py`` use them (fastjepa's own code, not
theirs): every name comes from ``fastjepa.`` at the reference's module path.

    python reference_client.py --fname CONFIG.yaml --devices cpu [cpu ...] --port PORT [--target client|app] [--max-steps N]

starts one process per device as ``main.py`` does; each joins the group through
``init_distributed(rank_and_world_size=...)`` and runs ``train`` below (``--target client``, a
shortened copy of the reference trainer's loop) or ``fastjepa.train.main`` (``--target app``,
the reference's ``src.train.main``). ``Trainer`` is ``main_distributed.py``'s submitit job.
"""

import argparse
import copy
import logging
import multiprocessing as mp
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

from fastjepa.datasets.imagenet1k import make_imagenet1k
from fastjepa.helper import init_model, init_opt, load_checkpoint
from fastjepa.masks.multiblock import MaskCollator as MBMaskCollator
from fastjepa.masks.utils import apply_masks
from fastjepa.train import main as app_main
from fastjepa.transforms import make_transforms
from fastjepa.utils.distributed import AllGather, AllReduce, AllReduceSum, init_distributed
from fastjepa.utils.logging import AverageMeter, CSVLogger, gpu_timer, grad_logger
from fastjepa.utils.tensors import repeat_interleave_batch

logger = logging.getLogger()


def train(args, resume_preempt=False, max_steps=None):
    """The reference trainer's ``main``: models, masks, data, optimizer, DDP, a resume, the
    loop with its CSV and checkpoints; ``max_steps`` cuts each epoch short."""
    meta, data, mask, opt, log = args["meta"], args["data"], args["mask"], args["optimization"], args["logging"]
    device = torch.device("cpu")
    torch.manual_seed(0)
    np.random.seed(0)
    world_size, rank = init_distributed()
    folder, tag = log["folder"], log["write_tag"]
    latest_path = os.path.join(folder, f"{tag}-latest.pth.tar")
    csv_logger = CSVLogger(os.path.join(folder, f"{tag}_r{rank}.csv"), ("%d", "epoch"), ("%d", "itr"), ("%.5f", "loss"),
                           ("%.5f", "mask-A"), ("%.5f", "mask-B"), ("%d", "time (ms)"))
    encoder, predictor = init_model(device=device, patch_size=mask["patch_size"], crop_size=data["crop_size"], pred_depth=meta["pred_depth"],
                                    pred_emb_dim=meta["pred_emb_dim"], model_name=meta["model_name"])
    target_encoder = copy.deepcopy(encoder)
    mask_collator = MBMaskCollator(input_size=data["crop_size"], patch_size=mask["patch_size"], pred_mask_scale=mask["pred_mask_scale"],
                                   enc_mask_scale=mask["enc_mask_scale"], aspect_ratio=mask["aspect_ratio"], nenc=mask["num_enc_masks"],
                                   npred=mask["num_pred_masks"], allow_overlap=mask["allow_overlap"], min_keep=mask["min_keep"])
    transform = make_transforms(crop_size=data["crop_size"], crop_scale=data["crop_scale"], gaussian_blur=data["use_gaussian_blur"],
                                horizontal_flip=data["use_horizontal_flip"], color_distortion=data["use_color_distortion"],
                                color_jitter=data["color_jitter_strength"])
    _, loader, sampler = make_imagenet1k(transform=transform, batch_size=data["batch_size"], collator=mask_collator, pin_mem=data["pin_mem"],
                                         training=True, num_workers=data["num_workers"], world_size=world_size, rank=rank,
                                         root_path=data["root_path"], image_folder=data["image_folder"], copy_data=meta["copy_data"],
                                         drop_last=True)
    ipe = len(loader)
    optimizer, scaler, scheduler, wd_scheduler = init_opt(encoder=encoder, predictor=predictor, wd=float(opt["weight_decay"]),
                                                          final_wd=float(opt["final_weight_decay"]), start_lr=opt["start_lr"], ref_lr=opt["lr"],
                                                          final_lr=opt["final_lr"], iterations_per_epoch=ipe, warmup=opt["warmup"],
                                                          num_epochs=opt["epochs"], ipe_scale=opt["ipe_scale"], use_bfloat16=meta["use_bfloat16"])
    encoder = DistributedDataParallel(encoder, static_graph=True)
    predictor = DistributedDataParallel(predictor, static_graph=True)
    target_encoder = DistributedDataParallel(target_encoder)
    for p in target_encoder.parameters():
        p.requires_grad = False
    total = int(ipe * opt["epochs"] * opt["ipe_scale"])
    ema = opt["ema"]
    momentum_scheduler = (ema[0] + i * (ema[1] - ema[0]) / total for i in range(total + 1))
    start_epoch = 0
    if meta["load_checkpoint"] or resume_preempt:
        encoder, predictor, target_encoder, optimizer, scaler, start_epoch = load_checkpoint(
            device=device, r_path=latest_path, encoder=encoder, predictor=predictor, target_encoder=target_encoder, opt=optimizer, scaler=scaler)
        for _ in range(start_epoch * ipe):
            scheduler.step()
            wd_scheduler.step()
            next(momentum_scheduler)
            mask_collator.step()

    for epoch in range(start_epoch, opt["epochs"]):
        sampler.set_epoch(epoch)
        loss_meter, time_meter = AverageMeter(), AverageMeter()
        for itr, (udata, masks_enc, masks_pred) in enumerate(loader):
            if itr == max_steps:
                break
            imgs = udata[0].to(device, non_blocking=True)
            masks_enc = [m.to(device, non_blocking=True) for m in masks_enc]
            masks_pred = [m.to(device, non_blocking=True) for m in masks_pred]

            def train_step():
                new_lr, new_wd = scheduler.step(), wd_scheduler.step()
                with torch.no_grad():
                    h = target_encoder(imgs)
                    h = F.layer_norm(h, (h.size(-1),))
                    B = len(h)
                    h = repeat_interleave_batch(apply_masks(h, masks_pred), B, repeat=len(masks_enc))
                z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
                loss = AllReduce.apply(F.smooth_l1_loss(z, h))
                loss.backward()
                optimizer.step()
                grad_stats = grad_logger(encoder.named_parameters())
                optimizer.zero_grad()
                with torch.no_grad():
                    m = next(momentum_scheduler)
                    for param_q, param_k in zip(encoder.parameters(), target_encoder.parameters()):
                        param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
                return float(loss), new_lr, new_wd, grad_stats

            (loss, new_lr, new_wd, grad_stats), etime = gpu_timer(train_step)
            loss_meter.update(loss)
            time_meter.update(etime)
            csv_logger.log(epoch + 1, itr, loss, masks_enc[0].shape[1], masks_pred[0].shape[1], etime)
            logger.info("[%d, %5d] loss: %.3f [wd: %.2e] [lr: %.2e] grad_stats: [%.2e %.2e] (%.2e, %.2e)", epoch + 1, itr, loss_meter.avg,
                        new_wd, new_lr, grad_stats.first_layer, grad_stats.last_layer, grad_stats.min, grad_stats.max)
            assert not np.isnan(loss), "loss is nan"
        # every rank's last loss, and their sum: AllReduce made them equal
        gathered = AllGather.apply(torch.tensor([loss]))
        assert gathered.shape == (world_size,) and torch.allclose(AllReduceSum.apply(torch.tensor([loss])), gathered.sum())
        if rank == 0:
            torch.save({"encoder": encoder.state_dict(), "predictor": predictor.state_dict(), "target_encoder": target_encoder.state_dict(),
                        "opt": optimizer.state_dict(), "scaler": None if scaler is None else scaler.state_dict(), "epoch": epoch + 1,
                        "loss": loss_meter.avg, "batch_size": data["batch_size"], "world_size": world_size, "lr": opt["lr"]}, latest_path)


def process_main(rank, fname, world_size, port, target, max_steps):
    """``main.py``'s process: load the YAML, join the group, run the trainer."""
    logging.basicConfig(stream=sys.stdout)
    logger.setLevel(logging.INFO if rank == 0 else logging.ERROR)
    with open(fname) as f:
        params = yaml.load(f, Loader=yaml.FullLoader)
    world_size, rank = init_distributed(port=port, rank_and_world_size=(rank, world_size))
    logger.info(f"Running... (rank: {rank}/{world_size})")
    if target == "client":
        train(args=params, max_steps=max_steps)
    else:
        app_main(args=params)
    torch.distributed.destroy_process_group()


class Trainer:
    """``main_distributed.py``'s submitit job: a requeue (``checkpoint``) resumes from -latest."""

    def __init__(self, fname="configs.yaml", load_model=None):
        self.fname, self.load_model = fname, load_model

    def __call__(self):
        with open(self.fname) as f:
            params = yaml.load(f, Loader=yaml.FullLoader)
        return app_main(args=params, resume_preempt=False if self.load_model is None else self.load_model)

    def checkpoint(self):
        import submitit

        return submitit.helpers.DelayedSubmission(Trainer(self.fname, True))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fname", required=True)
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--port", type=int, default=40112)
    parser.add_argument("--target", choices=("client", "app"), default="client")
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch of the client's loop")
    cli = parser.parse_args()
    mp.set_start_method("spawn")
    world = len(cli.devices)
    processes = [mp.Process(target=process_main, args=(rank, cli.fname, world, cli.port, cli.target, cli.max_steps)) for rank in range(world)]
    for p in processes:
        p.start()
    for p in processes:  # the reference never joins; a test needs the exit codes
        p.join()
    sys.exit(max(p.exitcode for p in processes))
