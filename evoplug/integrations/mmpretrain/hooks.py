"""``EvoOptionsHook``: change evoplug options at given epochs (or iterations) of training.

The authors' DeiT recipe selects tokens in every block for the first 200 of 300 epochs and once
per stage for the last 100 (their ``engine_deit.py`` switches ``stage_wise_prune`` at epoch 200).
With evoplug that is one hook in the config::

    custom_hooks = [dict(type='EvoOptionsHook',
                         schedule={0: dict(reselect_every=1), 200: dict(reselect_every=4)})]

Before every training epoch (``by_epoch=True``, the default) or iteration, the entry with the
largest key not above the current epoch (iteration) is in force, so a resumed run picks up the
right options; validation between epochs runs with the options in force. The options apply to
every converted module of the model (:func:`evoplug.set_options`): ``keep_ratio``,
``reselect_every``, ``trade_off``, ``start_block``, ``representative``... Options read at
conversion (``num_prefix_tokens``, ``global_query``) cannot change and are refused when the hook
is built. After training the model keeps the last options applied; a test or deployment config
sets its own through ``evo=dict(...)``.
"""
from __future__ import annotations

import logging
from typing import Dict, List

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

import evoplug
from evoplug.options import CONVERSION_FIELDS, EvoOptions


def converted_roots(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` that ``evoplug.convert`` converted (they hold its report)."""
    return [m for m in model.modules() if getattr(m, "_evoplug_report", None) is not None]


@HOOKS.register_module()
class EvoOptionsHook(Hook):
    """Apply ``schedule[k]`` (a dict of evoplug options) from epoch (or iteration) ``k`` on."""

    priority = "VERY_HIGH"      # before the other hooks' per-epoch work sees the model

    def __init__(self, schedule: Dict[int, dict], by_epoch: bool = True):
        if not isinstance(schedule, dict) or not schedule:
            raise ValueError("EvoOptionsHook: schedule must be a non-empty dict {epoch: {option: value}}")
        parsed = {}
        for k, v in schedule.items():
            # (a key given by --cfg-options, custom_hooks.0.schedule.3.keep_ratio=0.75, comes
            # as the string '3'; it was refused as no epoch, audit V9 of the thirty-seventh
            # session; given after the config's own key 3, it replaces it)
            if isinstance(k, str) and k.strip().isdigit():
                k = int(k)
            step = int(k) if isinstance(k, int) and not isinstance(k, bool) else -1
            if step < 0:
                raise ValueError(f"EvoOptionsHook: schedule key {k!r} is not an epoch/iteration >= 0")
            if not isinstance(v, dict):
                raise TypeError(f"EvoOptionsHook: schedule[{k!r}] must be a dict of options, got {v!r}")
            bad = CONVERSION_FIELDS & set(v)
            if bad:
                raise ValueError(f"EvoOptionsHook: {sorted(bad)} are read at conversion and cannot "
                                 "change during training")
            EvoOptions().replace(**v)          # unknown names and bad values fail here, at build
            parsed[step] = {**parsed.get(step, {}), **v}
        self.schedule = dict(sorted(parsed.items()))
        self.by_epoch = bool(by_epoch)
        self._applied = None

    def _apply(self, runner, step: int) -> None:
        keys = [k for k in self.schedule if k <= step]
        if not keys or keys[-1] == self._applied:
            return
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        roots = converted_roots(model)
        if not roots:
            raise TypeError(f"EvoOptionsHook: {type(model).__name__} holds no module converted by "
                            "evoplug")
        key = keys[-1]
        for m in roots:
            evoplug.set_options(m, **self.schedule[key])
        self._applied = key
        unit = "epoch" if self.by_epoch else "iteration"
        print_log(f"evoplug: from {unit} {key}: {self.schedule[key]}", logger="current")

    def before_train(self, runner) -> None:
        from mmengine.runner import EpochBasedTrainLoop
        loop = runner.train_loop
        if self.by_epoch and not isinstance(loop, EpochBasedTrainLoop) and max(self.schedule) > 0:
            raise ValueError(f"EvoOptionsHook: by_epoch=True, but the train loop is "
                             f"{type(loop).__name__} (no epochs): the entries after epoch 0 would "
                             "never apply; set by_epoch=False and give iterations")
        last = loop.max_epochs if self.by_epoch else loop.max_iters
        never = [k for k in self.schedule if k >= last]
        if never:
            print_log(f"evoplug: EvoOptionsHook entries {never} lie beyond the last "
                      f"{'epoch' if self.by_epoch else 'iteration'} ({last - 1}) and will not apply",
                      logger="current", level=logging.WARNING)
        self._applied = None
        self._apply(runner, runner.epoch if self.by_epoch else runner.iter)

    def before_train_epoch(self, runner) -> None:
        if self.by_epoch:
            self._apply(runner, runner.epoch)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if not self.by_epoch:
            self._apply(runner, runner.iter)
