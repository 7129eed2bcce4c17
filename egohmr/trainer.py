"""Stage-2 training loop (the original's), as functions; ``train_egohmr.py`` only parses flags.

Per iteration: draw ``t`` uniformly (numpy's global RNG), noise the normalised GT pose to ``x_t``, predict x0 in one
step (condition dropout active), SMPL-space losses, AdamW step. Every ``val_step`` iterations the val split is
sampled with DDIM-5 (or DDPM) from fresh noise and ``best_model_vis.pt`` is written when the visible-joint
pelvis-aligned error improves; ``last_model.pt`` every ``save_step`` iterations and at the end.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, Optional

import torch

from dataloaders.body_rep_stats import save_body_rep_stats
from diffusion import UniformSampler, create_gaussian_diffusion
from egohmr.checkpoints import load_backbone_from_prohmr
from egohmr.model import EgoHMR
from utils import distributed
from utils.io import DataError
from utils.optim import adamw
from utils.tensors import precision_context
from utils.run import (check_finite_losses, check_run_paths, get_logger, log_scalars, open_run_dir,
                       open_summary_writer, prepare_run, recursive_to, run_training_loop)
from utils.run_state import RunRecord, choose_data_seed, preserved_rng, resume_request, run_config, training_loaders

VAL_METRIC = 'loss_keypoints_3d_vis'
STATS_DIRNAME = 'preprocess_stats'


def respacing_of(flag: str) -> str:
    """``--timestep_respacing_eval`` value -> respacing string ('ddpm' means all steps)."""
    return '' if flag == 'ddpm' else flag


def sampling_method_of(flag: str) -> str:
    return 'ddpm' if flag in ('', 'ddpm') else 'ddim'


def weight_flag(term: str) -> str:
    """Flag / constructor name of a loss weight (``weight_loss_<term>``; ``weight_coap_penetration``)."""
    return 'weight_coap_penetration' if term == 'coap_penetration' else f'weight_loss_{term}'


def build_model(args, cfg, x_mean, x_std, device) -> EgoHMR:
    """The training-configured network (original flags), optionally with the ProHMR image encoder."""
    model = EgoHMR.from_config(cfg, data_dir=args.data_dir, body_rep_mean=x_mean, body_rep_std=x_std, training=True,
                               coap_checkpoint=args.coap_checkpoint)
    if args.load_pretrained_img_enc:
        load_backbone_from_prohmr(model, args.checkpoint_img_enc, log=get_logger().info)
    return model.to(device)


def build_datasets(args, cfg, run_dir: Optional[str]):
    """(train set, val set); with ``run_dir`` the train set writes ``<run>/preprocess_stats/preprocess_stats.npz``."""
    from dataloaders.egobody_dataset import EgoBodyDataset

    common = dict(data_dir=args.data_dir, add_scale=args.add_bbox_scale, scene_type=args.scene_type,
                  scene_cano=args.scene_cano, scene_downsample_rate=args.scene_downsample_rate)
    train_set = EgoBodyDataset(cfg, args.dataset_root, split='train', do_augment=args.do_augment, train=True,
                               get_diffuse_feature=True,
                               body_rep_stats_dir=os.path.join(run_dir, STATS_DIRNAME) if run_dir else None,
                               seed=args.seed, **common)
    val_set = EgoBodyDataset(cfg, args.dataset_root, split='val', spacing=args.eval_spacing, do_augment=False,
                             **common)
    if len(train_set) < args.batch_size:
        raise DataError(f"the train split of '{args.dataset_root}' has {len(train_set)} frames, fewer than "
                        f"--batch_size {args.batch_size}")
    if len(val_set) == 0:
        raise DataError(f"the val split of '{args.dataset_root}' is empty with --eval_spacing {args.eval_spacing}")
    return train_set, val_set


def train_step(model: EgoHMR, diffusion, sampler: UniformSampler, batch: Dict, optimizer,
               epoch: int, precision: str = 'fp32') -> Dict[str, float]:
    """One optimisation step on ``batch``; returns the loss terms as floats.

    ``precision='bf16'`` (``--precision``): the forward (encoders, GCN) under bf16 autocast; the decode to SMPL,
    the losses (COAP's included) and the optimiser in fp32."""
    model.train()
    bs = batch['img'].shape[0]
    t, _ = sampler.sample(bs, batch['img'].device)
    x_start = model.x_start_from_smpl_params(batch['smpl_params'])
    x_t = diffusion.q_sample(x_start, t, noise=torch.randn_like(x_start))
    with precision_context(precision, x_t.device):
        output = model(batch, t, x_t=x_t)
    loss = model.compute_loss(batch, output, cur_epoch=epoch)
    check_finite_losses({'loss': loss, **output['losses']})
    optimizer.zero_grad()
    loss.backward()
    distributed.average_gradients(model.trainable_parameters())     # no-op in one process
    optimizer.step()
    distributed.broadcast_norm_buffers(model)
    return {k: float(v) for k, v in output['losses'].items()}


@torch.no_grad()
def validate(model: EgoHMR, diffusion, loader, device, method: str = 'ddim', epoch: int = 0) -> Dict[str, float]:
    """Sample every val batch from fresh noise (no guidance), compute the losses on the last step's output.

    Returns the per-batch mean of every loss term and ``loss_keypoints_3d_vis`` = sum of visible-joint errors /
    number of visible joints x 1000 (mm).
    """
    model.eval()
    sums, batches, vis_sum, vis_num = defaultdict(float), 0, 0.0, 0
    for batch in loader:
        batch = recursive_to(batch, device)
        batch['condition'] = model.sampling_condition(batch)
        shape = (batch['img'].shape[0], 144)
        result = diffusion.sample(model.denoise, shape, method='ddpm' if method == 'ddpm' else 'ddim',
                                  model_kwargs={'batch': batch}, device=device)
        output = result['model_output']
        model.compute_loss(batch, output, cur_epoch=epoch)
        for key, value in output['losses'].items():
            if key == 'loss_keypoints_3d_vis_batch_sum':
                vis_sum += float(value)
            else:
                sums[key] += float(value)
        vis_num += int(output['joint_vis_num_batch'])
        batches += 1
    if batches == 0:
        raise DataError("the val split is empty: nothing to validate on")
    result = {k: v / batches for k, v in sums.items()}
    result[VAL_METRIC] = 1000.0 * vis_sum / vis_num if vis_num else math.nan
    return result


def format_losses(values: Dict[str, float], keys=('loss', VAL_METRIC, 'loss_v2v', 'loss_keypoints_3d',
                                                   'loss_coap_penetration')) -> str:
    return ', '.join(f'{k}={values[k]:.4f}' for k in keys if k in values)


def train(args, cfg, cfg_path: Optional[str] = None) -> Dict:
    """The whole stage-2 training run (or its continuation, ``--resume``); returns a summary.

    The inputs (output folder, checkpoints, data) are all read and checked before the run folder is created.
    """
    resumed, resume_dir = resume_request(args)
    if resumed is not None:
        args.load_pretrained_img_enc = False          # the weights come from the checkpoint
    files = [('--coap_checkpoint', args.coap_checkpoint, 'COAP checkpoint', '')] if args.coap_checkpoint else []
    if args.load_pretrained_img_enc:
        files.append(('--checkpoint_img_enc', args.checkpoint_img_enc, 'ProHMR checkpoint',
                      'pass --load_pretrained_img_enc False to start from random weights'))
    check_run_paths(args, files)
    device = prepare_run(args)
    data_seed = choose_data_seed(args, resumed)
    train_set, val_set = build_datasets(args, cfg, None)
    model = distributed.convert_sync_batchnorm(build_model(args, cfg, train_set.Xmean, train_set.Xstd, device),
                                               args.sync_bn, device)
    run_dir, logger = open_run_dir(args, cfg_path, device, run_dir=resume_dir)
    if distributed.is_main():
        save_body_rep_stats(os.path.join(run_dir, STATS_DIRNAME), train_set.Xmean, train_set.Xstd)
    logger.info(f"body-representation statistics written to {os.path.join(run_dir, STATS_DIRNAME)}")
    distributed.broadcast_state(model)                               # every rank starts from rank 0's weights
    if model.loss_weights['coap_penetration'] > 0:
        if model.coap is None:
            logger.info("COAP is unavailable: the penetration loss is off")
        elif not args.coap_checkpoint:
            logger.info("warning: no --coap_checkpoint: COAP has random weights, so the penetration loss (from epoch "
                        f"{args.start_coap_epoch}) is meaningless; pass trained COAP weights or "
                        "--weight_coap_penetration 0")
    train_loader, train_sampler, val_loader = training_loaders(args, train_set, val_set, data_seed)
    optimizer = adamw(model.trainable_parameters(), lr=float(cfg.TRAIN.LR), weight_decay=float(cfg.TRAIN.WEIGHT_DECAY))
    diffusion_train = create_gaussian_diffusion(args.num_diffusion_timesteps, '')
    diffusion_eval = create_gaussian_diffusion(args.num_diffusion_timesteps,
                                               respacing_of(args.timestep_respacing_eval))
    sampler = UniformSampler(diffusion_train)
    method = sampling_method_of(args.timestep_respacing_eval)
    writer = open_summary_writer(run_dir, logger) if distributed.is_main() else None
    iters_per_epoch = len(train_loader)
    logger.info(f"train: {len(train_set)} frames, {iters_per_epoch} iterations/epoch; val: {len(val_set)} frames "
                f"(sampling {args.timestep_respacing_eval})")
    record = RunRecord(model, (optimizer,), run_config(args, cfg, data_seed, 'egohmr'), run_dir, VAL_METRIC,
                       'best_model_vis.pt', body_rep_stats={'Xmean': train_set.Xmean, 'Xstd': train_set.Xstd})

    def run_validation(step: int, epoch: int, count_as_best: bool = True) -> None:
        if not distributed.is_main():
            return
        val = validate(model, diffusion_eval, val_loader, device, method, epoch)
        log_scalars(writer, 'val', val, step)
        improved = record.record_validation(step, epoch, val, count_as_best)
        logger.info(f"[val] iter {step}: {format_losses(val)}" + ('  -> best_model_vis.pt' if improved else ''))

    if resumed is not None:
        record.restore(resumed, logger)
    elif args.val_at_start:
        with preserved_rng():
            run_validation(0, 0, count_as_best=False)

    def step_fn(batch: Dict, epoch: int) -> Dict[str, float]:
        return train_step(model, diffusion_train, sampler, recursive_to(batch, device), optimizer, epoch,
                          getattr(args, 'precision', 'fp32'))

    step = run_training_loop(args, train_loader, train_sampler, step_fn, run_validation, record, writer, logger,
                             format_losses, validated_at_start=args.val_at_start and resumed is None)
    logger.info(f"done: {step} iterations; best val {VAL_METRIC} = {record.best:.2f} mm")
    return {'run_dir': run_dir, 'iterations': step, 'best': record.best, 'history': record.history}
