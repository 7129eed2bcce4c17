"""Stage-1 training loop (the original's), as functions; ``train_prohmr_scene.py`` only parses flags.

Per iteration: EgoBody batch -> ``forward_step(train=True)`` -> losses + generator adversarial term -> AdamW
step of backbone/flow/scene encoder -> discriminator step on the detached predictions vs a MoCap batch.
Every ``val_step`` iterations the whole val split is evaluated (eval mode, ``NUM_TEST_SAMPLES``) and
``best_model.pt`` is written when the val ``loss_keypoints_3d_mode`` improves; ``last_model.pt`` every
``save_step`` iterations.
"""
from __future__ import annotations

import os
from collections import defaultdict
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from prohmr_scene.model import ProHMRScene
from utils import distributed
from utils.checkpoint_io import PROHMR_HINT, load_prohmr_backbone
from utils.io import DataError
from utils.optim import adamw
from utils.run import (check_finite_losses, check_run_paths, get_logger, log_scalars, open_run_dir,
                       open_summary_writer, prepare_run, recursive_to, run_training_loop)
from utils.run_state import (EpochSampler, RunRecord, choose_data_seed, endless_batches, preserved_rng,
                             resume_request, run_config, training_loaders)

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


def build_loaders(args, cfg, data_seed: int):
    """(train loader, its EpochSampler, val loader, MoCap loader, its EpochSampler).

    The training order of epoch e and the MoCap batches come from ``data_seed`` alone (exact resume).
    """
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
    train_loader, train_sampler, val_loader = training_loaders(args, train_set, val_set, data_seed)
    mocap_set = MoCapDataset(mocap_path(args.data_dir))
    mocap_sampler = EpochSampler(len(mocap_set), data_seed + 1, shuffle=True, rank=distributed.rank(),
                                 num_replicas=distributed.world_size())
    mocap = DataLoader(mocap_set, batch_size=args.batch_size, sampler=mocap_sampler, num_workers=0,
                       generator=torch.Generator().manual_seed(data_seed + 1))
    return train_loader, train_sampler, val_loader, mocap, mocap_sampler


def make_optimizers(model: ProHMRScene, cfg):
    """AdamW for backbone + flow (incl. FC head) + scene encoder, and AdamW for the discriminator."""
    gen_params, disc_params = model.trainable_groups()
    lr, wd = float(cfg.TRAIN.LR), float(cfg.TRAIN.WEIGHT_DECAY)
    return adamw(gen_params, lr=lr, weight_decay=wd), adamw(disc_params, lr=lr, weight_decay=wd)


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
    gen_params, disc_params = model.trainable_groups()
    distributed.average_gradients(gen_params)                  # no-op in one process
    optimizer.step()

    loss_disc = model.discriminator_loss(output, mocap_batch)
    check_finite_losses({'loss_disc': loss_disc})
    optimizer_disc.zero_grad()
    (adv_weight * loss_disc).backward()
    distributed.average_gradients(disc_params)
    optimizer_disc.step()
    distributed.broadcast_norm_buffers(model)

    out = {k: float(v) for k, v in terms.items()}
    out.update(loss=float(loss.detach()), loss_gen=float(loss_adv.detach()), loss_disc=float(loss_disc.detach()))
    return out


@torch.no_grad()
def validate(model: ProHMRScene, loader, device) -> Dict[str, float]:
    """Mean of the per-batch loss dicts over the loader (eval mode, ``NUM_TEST_SAMPLES`` samples).

    The original divides the sum by (#batches - 1); we divide by #batches (an off-by-one, fixed).
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
    """The whole stage-1 training run (or its continuation, ``--resume``); returns a summary.

    The inputs (output folder, checkpoint, data) are all read and checked before the run folder is created.
    """
    resumed, resume_dir = resume_request(args)
    if resumed is not None:
        args.load_pretrained = False          # the weights come from the checkpoint
    check_run_paths(args, [('--checkpoint', args.checkpoint, 'ProHMR checkpoint', PROHMR_HINT)]
                    if args.load_pretrained else [])
    device = prepare_run(args)
    data_seed = choose_data_seed(args, resumed)
    model = distributed.convert_sync_batchnorm(build_model(args, cfg, device), args.sync_bn, device)
    train_loader, train_sampler, val_loader, mocap_loader, mocap_sampler = build_loaders(args, cfg, data_seed)
    run_dir, logger = open_run_dir(args, cfg_path, device, run_dir=resume_dir)
    distributed.broadcast_state(model)                          # every rank starts from rank 0's weights
    optimizer, optimizer_disc = make_optimizers(model, cfg)
    writer = open_summary_writer(run_dir, logger) if distributed.is_main() else None
    logger.info(f"train: {len(train_loader.dataset)} frames, {len(train_loader)} iterations/epoch; "
                f"val: {len(val_loader.dataset)} frames")
    record = RunRecord(model, (optimizer, optimizer_disc), run_config(args, cfg, data_seed, 'prohmr_scene'), run_dir,
                       VAL_METRIC, 'best_model.pt')

    def run_validation(step: int, epoch: int, count_as_best: bool = True) -> None:
        if not distributed.is_main():
            return
        val = validate(model, val_loader, device)
        log_scalars(writer, 'val', val, step)
        improved = record.record_validation(step, epoch, val, count_as_best)
        logger.info(f"[val] iter {step}: {format_losses(val)}" + ('  -> best_model.pt' if improved else ''))

    if resumed is not None:
        record.restore(resumed, logger)
    else:
        if args.val_at_start or distributed.world_size() > 1:
            # ActNorm data initialisation now, on rank 0's first batch for every rank (normally in the first step)
            with preserved_rng():
                data_initialize(model, recursive_to(next(iter(train_loader)), device))
            distributed.broadcast_state(model)
        if args.val_at_start:
            with preserved_rng():
                run_validation(0, 0, count_as_best=False)   # the untrained model is logged, never saved as best
    mocap_iter = endless_batches(mocap_loader, mocap_sampler, start_batch=record.start_step)
    def step_fn(batch: Dict, epoch: int) -> Dict[str, float]:
        return train_step(model, recursive_to(batch, device), recursive_to(next(mocap_iter), device),
                          optimizer, optimizer_disc)

    step = run_training_loop(args, train_loader, train_sampler, step_fn, run_validation, record, writer, logger,
                             format_losses, validated_at_start=args.val_at_start and resumed is None)
    logger.info(f"done after {step} iterations; checkpoints in {run_dir}")
    return {'run_dir': run_dir, 'iterations': step, 'val_history': record.history, 'best_val': record.best}
