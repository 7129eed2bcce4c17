"""Stage-1 training loop (spec models.md §1.10), as functions; ``train_prohmr_scene.py`` only parses flags.

Per iteration: EgoBody batch -> ``forward_step(train=True)`` -> losses + generator adversarial term -> AdamW
step of backbone/flow/scene encoder -> discriminator step on the detached predictions vs a MoCap batch.
Every ``val_step`` iterations the whole val split is evaluated (eval mode, ``NUM_TEST_SAMPLES``) and
``best_model.pt`` is written when the val ``loss_keypoints_3d_mode`` improves; ``last_model.pt`` every
``save_step`` iterations.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from prohmr_scene.checkpoints import PROHMR_HINT, load_prohmr_backbone, save_stage1_checkpoint
from prohmr_scene.model import ProHMRScene
from utils.io import DataError
from utils.run import (check_finite_losses, check_run_paths, endless, get_logger, log_scalars, open_run_dir,
                       open_summary_writer, prepare_run, recursive_to, training_loop)

VAL_METRIC = 'loss_keypoints_3d_mode'


def mocap_path(data_dir: str) -> str:
    return os.path.join(data_dir, 'datasets', 'cmu_mocap.npz')


def build_model(args, cfg, device) -> ProHMRScene:
    """The network, optionally initialised from ProHMR's checkpoint (``--load_pretrained``)."""
    model = ProHMRScene(cfg, data_dir=args.data_dir, with_focal_length=args.with_focal_length,
                        with_bbox_info=args.with_bbox_info, with_cam_center=args.with_cam_center,
                        scene_feat_dim=512, scene_cano=args.scene_cano, with_full_2d_loss=args.with_full_2d_loss,
                        with_global_3d_loss=args.with_global_3d_loss)
    if args.load_pretrained:
        if not os.path.isfile(args.checkpoint):
            raise DataError(f"--checkpoint: no ProHMR checkpoint at '{args.checkpoint}'; {PROHMR_HINT}")
        load_prohmr_backbone(model, args.checkpoint, only_backbone=args.load_only_backbone,
                             log=get_logger().info)
    return model.to(device)


def build_loaders(args, cfg):
    """(train loader, val loader, endless MoCap iterator)."""
    from dataloaders.egobody_dataset import EgoBodyDataset
    from dataloaders.mocap_dataset import MoCapDataset

    common = dict(data_dir=args.data_dir, add_scale=args.add_bbox_scale, scene_type=args.scene_type,
                  scene_cano=args.scene_cano, scene_downsample_rate=args.scene_downsample_rate)
    train_set = EgoBodyDataset(cfg, args.dataset_root, split='train', spacing=1, do_augment=args.do_augment,
                               train=True, seed=args.seed, **common)
    val_set = EgoBodyDataset(cfg, args.dataset_root, split='val', spacing=1, do_augment=False, **common)
    if len(train_set) < args.batch_size:
        raise DataError(f"the train split of '{args.dataset_root}' has {len(train_set)} frames, fewer than "
                        f"--batch_size {args.batch_size}")
    generator = torch.Generator()
    if args.seed is not None:
        generator.manual_seed(args.seed)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=args.shuffle, drop_last=True,
                              num_workers=args.num_workers, generator=generator)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    mocap = DataLoader(MoCapDataset(mocap_path(args.data_dir)), batch_size=args.batch_size, shuffle=True,
                       num_workers=0, generator=generator)
    return train_loader, val_loader, endless(mocap)


def make_optimizers(model: ProHMRScene, cfg):
    """AdamW for backbone + flow (incl. FC head) + scene encoder, and AdamW for the discriminator."""
    gen_params, disc_params = model.trainable_groups()
    lr, wd = float(cfg.TRAIN.LR), float(cfg.TRAIN.WEIGHT_DECAY)
    return (torch.optim.AdamW(gen_params, lr=lr, weight_decay=wd),
            torch.optim.AdamW(disc_params, lr=lr, weight_decay=wd))


def train_step(model: ProHMRScene, batch: Dict, mocap_batch: Dict, optimizer, optimizer_disc) -> Dict[str, float]:
    """One generator step and one discriminator step; returns the loss components as floats."""
    adv_weight = float(model.cfg.LOSS_WEIGHTS.ADVERSARIAL)
    model.train()
    output = model.forward_step(batch, train=True)
    loss, terms = model.compute_loss(batch, output, train=True)
    loss_adv = model.adversarial_loss(output)
    loss = loss + adv_weight * loss_adv
    check_finite_losses({'loss': loss, 'loss_gen': loss_adv, **terms})
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    loss_disc = model.discriminator_loss(output, mocap_batch)
    check_finite_losses({'loss_disc': loss_disc})
    optimizer_disc.zero_grad()
    (adv_weight * loss_disc).backward()
    optimizer_disc.step()

    out = {k: float(v) for k, v in terms.items()}
    out.update(loss=float(loss.detach()), loss_gen=float(loss_adv.detach()), loss_disc=float(loss_disc.detach()))
    return out


@torch.no_grad()
def validate(model: ProHMRScene, loader, device) -> Dict[str, float]:
    """Mean of the per-batch loss dicts over the loader (eval mode, ``NUM_TEST_SAMPLES`` samples).

    The original divides the sum by (#batches - 1); we divide by #batches (spec D§7.13, fixed).
    """
    model.eval()
    sums, count = defaultdict(float), 0
    for batch in loader:
        batch = recursive_to(batch, device)
        output = model.forward_step(batch, train=False)
        _, terms = model.compute_loss(batch, output, train=False)
        for key, value in terms.items():
            sums[key] += float(value)
        count += 1
    if count == 0:
        raise DataError("the val split is empty: nothing to validate on")
    return {k: v / count for k, v in sums.items()}


@torch.no_grad()
def data_initialize(model: ProHMRScene, batch: Dict) -> None:
    """Run the ActNorm data initialisation on ``batch`` now (normally it happens inside the first train step)."""
    model.train()
    model.initialize_actnorm(batch, model.conditioning(batch))


def format_losses(values: Dict[str, float], keys=('loss', VAL_METRIC, 'loss_v2v_mode', 'loss_nll')) -> str:
    return ', '.join(f'{k}={values[k]:.4f}' for k in keys if k in values)


def train(args, cfg, cfg_path: Optional[str] = None) -> Dict:
    """The whole stage-1 training run; returns a summary (run dir, iterations, val history).

    The inputs (output folder, checkpoint, data) are all read and checked before the run folder is created.
    """
    check_run_paths(args, [('--checkpoint', args.checkpoint, 'ProHMR checkpoint', PROHMR_HINT)]
                    if args.load_pretrained else [])
    device = prepare_run(args)
    model = build_model(args, cfg, device)
    train_loader, val_loader, mocap_iter = build_loaders(args, cfg)
    run_dir, logger = open_run_dir(args, cfg_path, device)
    optimizer, optimizer_disc = make_optimizers(model, cfg)
    writer = open_summary_writer(run_dir, logger)
    logger.info(f"train: {len(train_loader.dataset)} frames, {len(train_loader)} iterations/epoch; "
                f"val: {len(val_loader.dataset)} frames")

    history, best = [], math.inf

    def run_validation(step: int, count_as_best: bool = True) -> None:
        nonlocal best
        val = validate(model, val_loader, device)
        history.append({'iteration': step, **val})
        log_scalars(writer, 'val', val, step)
        improved = count_as_best and val[VAL_METRIC] < best
        if improved:
            best = val[VAL_METRIC]
            save_stage1_checkpoint(model, os.path.join(run_dir, 'best_model.pt'))
        logger.info(f"[val] iter {step}: {format_losses(val)}" + ('  -> best_model.pt' if improved else ''))

    if args.val_at_start:
        data_initialize(model, recursive_to(next(iter(train_loader)), device))
        run_validation(0, count_as_best=False)

    def step_fn(batch: Dict, epoch: int) -> Dict[str, float]:
        return train_step(model, recursive_to(batch, device), recursive_to(next(mocap_iter), device),
                          optimizer, optimizer_disc)

    step, _ = training_loop(
        train_loader, num_epoch=args.num_epoch, max_iters=args.max_iters, iters_per_epoch=len(train_loader),
        log_step=args.log_step, val_step=args.val_step, save_step=args.save_step, train_step=step_fn,
        validate=lambda step, epoch: run_validation(step),
        save_last=lambda: save_stage1_checkpoint(model, os.path.join(run_dir, 'last_model.pt')),
        writer=writer, logger=logger, format_losses=format_losses, validated_at_start=args.val_at_start)
    if writer is not None:
        writer.close()
    logger.info(f"done after {step} iterations; checkpoints in {run_dir}")
    return {'run_dir': run_dir, 'iterations': step, 'val_history': history, 'best_val': best}
