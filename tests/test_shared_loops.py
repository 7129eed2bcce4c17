"""Loops both stages share: utils.run.training_loop (iteration, logging, validation and saving cadence) and the
test scripts' render / viewer hook (utils.cli.visual_hook)."""
from utils.run import training_loop


class EpochDataset(list):
    def __init__(self, items):
        super().__init__(items)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


class Loader:
    def __init__(self, num_batches):
        self.dataset = EpochDataset(range(num_batches))

    def __iter__(self):
        return iter(self.dataset)

    def __len__(self):
        return len(self.dataset)


def run(max_iters, num_epoch=10, num_batches=4, validated_at_start=False):
    loader = Loader(num_batches)
    calls = {'train': [], 'val': [], 'save': 0, 'saved_at': []}

    def train_step(batch, epoch):
        calls['train'].append((epoch, batch))
        return {'loss': float(len(calls['train']))}

    def validate(step, epoch):
        calls['val'].append((step, epoch))

    def save_last(step, epoch):
        calls['save'] += 1
        calls['saved_at'].append((step, len(calls['val'])))   # the iteration and the validations it holds

    result = training_loop(loader, num_epoch=num_epoch, max_iters=max_iters, iters_per_epoch=num_batches,
                           log_step=2, val_step=3, save_step=5, train_step=train_step, validate=validate,
                           save_last=save_last, validated_at_start=validated_at_start)
    return result, calls, loader.dataset.epochs


def test_stops_at_max_iters_and_validates_the_last_weights_once():
    (steps, epoch), calls, epochs = run(max_iters=7)
    assert steps == 7 and epoch == 1
    assert calls['train'] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2)]
    assert calls['val'] == [(3, 0), (6, 1), (7, 1)]       # every 3 iterations, then the stopping point
    assert calls['save'] == 1 + 1                         # iteration 5, then the end of the run
    assert epochs == [0, 1]                               # seeded augmentation follows the epoch


def test_the_last_iterations_checkpoint_is_written_once_and_holds_every_validation():
    # ends on a validation and save step (15): the save_step checkpoint is the last one, not written twice
    (steps, _), calls, _ = run(max_iters=15)
    assert steps == 15 and calls['saved_at'] == [(5, 1), (10, 3), (15, 5)]
    # ends on a save step between validations (10): validated after that save, so saved again with it
    (steps, _), calls, _ = run(max_iters=10)
    assert calls['val'][-1] == (10, 2) and calls['saved_at'] == [(5, 1), (10, 3), (10, 4)]


def test_no_extra_validation_when_the_run_ends_on_a_validation_step():
    (steps, _), calls, _ = run(max_iters=6)
    assert steps == 6 and calls['val'] == [(3, 0), (6, 1)]


def test_without_max_iters_runs_all_epochs():
    (steps, epoch), calls, epochs = run(max_iters=None, num_epoch=2, num_batches=3)
    assert steps == 6 and epoch == 1 and epochs == [0, 1]
    assert [v[0] for v in calls['val']] == [3, 6]


def test_zero_iterations_only_saves():
    (steps, _), calls, epochs = run(max_iters=0, validated_at_start=True)
    assert steps == 0 and calls['train'] == [] and calls['val'] == [] and calls['save'] == 1 and epochs == []


def _sampler_run(max_iters, start_step=0, stop_after=None, num_items=10, batch_size=3, num_workers=0):
    """Batches (as index lists) that training_loop feeds to train_step with a real DataLoader + EpochSampler."""
    import torch

    from utils.run_state import EpochSampler, StopRequest
    sampler = EpochSampler(num_items, seed=5)
    loader = torch.utils.data.DataLoader(list(range(num_items)), batch_size=batch_size, sampler=sampler,
                                         drop_last=True, num_workers=num_workers)
    seen, stop = [], StopRequest()

    def train_step(batch, epoch):
        seen.append((epoch, batch.tolist()))
        if stop_after is not None and len(seen) == stop_after:
            stop.signal_name = 'SIGTERM'
        return {'loss': 0.0}

    saves = []
    training_loop(loader, num_epoch=100, max_iters=max_iters, iters_per_epoch=len(loader), log_step=100,
                  val_step=100, save_step=100, train_step=train_step, validate=lambda s, e: None,
                  save_last=lambda s, e: saves.append((s, e)), start_step=start_step, sampler=sampler, stop=stop)
    return seen, saves


def test_resumed_loop_sees_exactly_the_remaining_batches():
    """3 batches per epoch: 8 iterations in one go == 4 iterations, then a resume from iteration 4 to 8 (mid-epoch
    1), with in-process loading and with workers; epochs have different orders."""
    full, _ = _sampler_run(8)
    assert len(full) == 8 and full[0][1] != full[3][1]
    for workers in (0, 2):
        first, saves = _sampler_run(4, num_workers=workers)
        assert saves == [(4, 1)]
        rest, _ = _sampler_run(8, start_step=4, num_workers=workers)
        assert first + rest == full


def test_stop_request_saves_and_raises_after_the_step():
    import pytest

    from utils.run_state import RunInterrupted
    with pytest.raises(RunInterrupted, match='SIGTERM after iteration 2'):
        _sampler_run(8, stop_after=2)


def test_visual_hook_picks_render_then_viewer_then_nothing(monkeypatch, capsys):
    from types import SimpleNamespace

    import utils.renderer
    from utils.cli import close_hook, visual_hook

    made = []

    def factory(kind):
        def make(out):
            made.append((kind, out))
            return SimpleNamespace(close=lambda: made.append(('closed', kind)))
        return make

    args = SimpleNamespace(render=True, vis_o3d=False)
    close_hook(visual_hook(args, 'out/x', factory('render'), factory('o3d')))
    assert made == [('render', 'out/x'), ('closed', 'render')]
    made.clear()
    monkeypatch.setattr(utils.renderer, 'open3d_available', lambda: True)
    args = SimpleNamespace(render=False, vis_o3d=True)
    visual_hook(args, 'out/x', factory('render'), factory('o3d'))
    assert made == [('o3d', 'out/x_o3d')]
    made.clear()
    monkeypatch.setattr(utils.renderer, 'open3d_available', lambda: False)
    assert visual_hook(args, 'out/x', factory('render'), factory('o3d')) is None and made == []
    assert 'open3d is not installed' in capsys.readouterr().out
    assert visual_hook(SimpleNamespace(render=False, vis_o3d=False), 'o', factory('r'), factory('v')) is None
    close_hook(None)


def test_run_log_file_keeps_lines_logged_through_a_plain_get_logger(tmp_path):
    """A library call that asks for the logger without a run folder (as the pretrained-backbone loader does) must not
    drop the run's log file: every line reaches it."""
    import glob

    from utils.run import get_logger
    logger = get_logger(str(tmp_path), name='egohmr-test-log')
    logger.info('first line')
    get_logger(name='egohmr-test-log').info('second line')
    logger.info('third line')
    for handler in logger.handlers:
        handler.flush()
    (log_file,) = glob.glob(str(tmp_path / 'run_*.log'))
    text = open(log_file).read()
    assert all(line in text for line in ('first line', 'second line', 'third line'))
