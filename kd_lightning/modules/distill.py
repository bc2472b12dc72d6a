"""A student trained against a frozen teacher:
CE + sum_i lambda_i * NST_i + beta * KD + sum over `methods` of their weighted terms.

Teacher rules: frozen (requires_grad False), always in eval mode (train() is overridden), never in
the optimizer, never a hyperparameter, run under torch.no_grad(), and left out of checkpoints
unless `keep_teacher_in_checkpoint` (it is reloaded from its own source instead).

Learned parts of the compared methods (FitNets connectors, CRD embedding heads; submodules of
`self.methods`) train with the student: they are in its optimizer and its checkpoints (CRD's memory
banks too, as buffers), and never in `deployable_state_dict()` (model.pt holds the student alone).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd_lightning.data.cache import default_cache_dir
from kd_lightning.data.dataset import EpochSampler
from kd_lightning.distill import DistillInputs, DistillMethod, FeatureHooks, KDLoss, NSTLoss
from kd_lightning.distill.teacher_cache import LOGITS, CacheEpoch, TeacherCache, file_sha256
from kd_lightning.modules.classifier import ClassifierModule, OptimizerFactory, SchedulerFactory
from kd_lightning.modules.teacher import load_teacher, resolve_teacher_checkpoint

log = logging.getLogger(__name__)


class DistillModule(ClassifierModule):
    """Student + frozen teacher + hooked layer pairs.

    `feature_pairs`: [{"student": "layer4", "teacher": "layer4", "weight": 50.0}, ...]; each pair's
    NST term is logged as `train/nst_<student layer>`; `kd_weight` 0 turns KD off.

    `methods`: {key: DistillMethod} (FitNetsLoss, ATLoss, DKDLoss, RKDLoss, CRDLoss, each built by
    Hydra from its `_target_`), added to the same loss; each of a method's terms is logged as
    `train/<key>_<term>`. Their layers are hooked here (an unknown name fails before training,
    listing the valid ones), and one probe forward of zeros at `image_size` px, with student and
    teacher in eval mode under no_grad, gives them the feature shapes for their learned parts.
    Methods with `requires_index` (CRD) need batches (images, targets, indices).

    `teacher_cache`: {enabled, dir, max_gb}. When enabled (and the data module streams
    deterministically), the teacher's logits and hooked maps of every (epoch, sample) are read from
    a content-keyed disk cache (kd_lightning/distill/teacher_cache.py) filled by the first student
    of a seed; a batch not fully cached runs the live teacher and fills it. Bit-identical to the
    live teacher; anything the cache cannot do falls back to the live teacher with one log line.
    """

    def __init__(
        self,
        model: Mapping[str, Any],
        teacher: str,
        num_classes: int = 2,
        teacher_model: Mapping[str, Any] | None = None,
        nst: NSTLoss | None = None,
        feature_pairs: Sequence[Mapping[str, Any]] = (),
        kd: KDLoss | None = None,
        kd_weight: float = 0.0,
        ce_weight: float = 1.0,
        keep_teacher_in_checkpoint: bool = False,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        class_weights: list[float] | None = None,
        channels_last: bool = False,
        methods: Mapping[str, DistillMethod] | None = None,
        image_size: int | None = None,
        teacher_cache: Mapping[str, Any] | None = None,
    ) -> None:
        methods = _check_methods(methods)
        for key, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
            _check_module_weight(key, value)
        for i, pair in enumerate(feature_pairs):
            _check_module_weight(f"feature_pairs.{i}.weight", dict(pair).get("weight"))
        super().__init__(model, num_classes, optimizer, scheduler, class_weights, channels_last)
        # image_size only sizes the probe forward; as an hparam it would clash with the
        # datamodule's own image_size in Lightning's hparam merge whenever the two differ.
        # teacher_cache only decides where teacher outputs come from, never what they are.
        self.save_hyperparameters(
            ignore=["optimizer", "scheduler", "nst", "kd", "methods", "image_size", "teacher_cache"]
        )
        self.cache_config = _check_cache_config(teacher_cache)
        self.teacher_cache: TeacherCache | None = None
        self._cache_epoch: CacheEpoch | None = None
        teacher_net, self.teacher_spec = load_teacher(teacher, num_classes, teacher_model)
        self.teacher = teacher_net.requires_grad_(False).eval()
        if channels_last:
            self.teacher = self.teacher.to(memory_format=torch.channels_last)
        self.teacher_source = str(Path(teacher).resolve())
        self.pairs = [dict(pair) for pair in feature_pairs]
        if self.pairs and nst is None:
            raise ValueError(
                "module.feature_pairs is set but module.nst is null; expected an NSTLoss"
            )
        self.nst = nst
        self.kd = kd if kd is not None else KDLoss()
        self.kd_weight = float(kd_weight)
        self.ce_weight = float(ce_weight)
        self.keep_teacher = keep_teacher_in_checkpoint
        self.methods = nn.ModuleDict(methods)
        # KD alone needs no hooks; with pairs, an unknown layer name fails here, before training.
        self.hooks = []
        student_layers = [p["student"] for p in self.pairs]
        teacher_layers = [p["teacher"] for p in self.pairs]
        for method in self.methods.values():
            student_layers += method.student_layers()
            teacher_layers += method.teacher_layers()
        if student_layers:
            self.student_hooks = FeatureHooks(self.model, student_layers)
        if teacher_layers:
            self.teacher_hooks = FeatureHooks(self.teacher, teacher_layers)
        self.hooks = [
            h
            for h in (getattr(self, "student_hooks", None), getattr(self, "teacher_hooks", None))
            if h is not None
        ]
        if self.methods:
            self._build_methods(dict(model).get("in_channels", 1), image_size, num_classes)

    def _build_methods(self, in_channels: int, image_size: int | None, num_classes: int) -> None:
        """One probe forward (eval mode, no_grad: no BatchNorm statistic moves) for the shapes."""
        s_shapes: dict[str, torch.Size] = {}
        t_shapes: dict[str, torch.Size] = {}
        if self.hooks:  # logit-only methods (DKD) need no probe
            size = int(image_size) if image_size is not None else 64
            probe = torch.zeros(2, int(in_channels), size, size)
            was_training = self.model.training
            self.model.eval()
            try:
                with torch.no_grad():
                    self.model(probe)
                    self.teacher(probe)
                s_shapes = {k: v.shape for k, v in self.student_hooks.features.items()}
                t_shapes = {k: v.shape for k, v in self.teacher_hooks.features.items()}
            finally:
                self.clear_features()
                self.model.train(was_training)
        for method in self.methods.values():
            method.build(s_shapes, t_shapes, num_classes)

    def setup(self, stage: str) -> None:
        # CRD sizes its memory bank from the training set (and checks its items carry an index).
        binders = [
            m for m in self.methods.values() if type(m).bind_data is not DistillMethod.bind_data
        ]
        if stage == "fit" and self.cache_config["enabled"] and self.teacher_cache is None:
            self.teacher_cache = self._open_teacher_cache()
        if stage != "fit" or not binders:
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            raise ValueError(
                f"module.methods {[type(m).__name__ for m in binders]} need the training set; "
                "expected trainer.fit(..., datamodule=...)"
            )
        dataset = datamodule.train_dataloader().dataset
        for method in binders:
            method.bind_data(dataset)

    def _open_teacher_cache(self) -> TeacherCache | None:
        """The cache of this teacher on this data stream, or None (one line says why)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        identity = getattr(datamodule, "stream_identity", lambda: None)()
        if identity is None:
            log.warning(
                "teacher cache off: it needs an XRayDataModule with data.deterministic_stream=true"
                " (the same image for every (seed, epoch, index)); using the live teacher"
            )
            return None
        datamodule.use_train_indices()  # batches (images, targets, index)
        teacher_file = resolve_teacher_checkpoint(self.teacher_source)
        full = {
            "teacher": file_sha256(teacher_file),
            "data": identity,
            "precision": str(self.trainer.precision),
            "channels_last": bool(self.channels_last),
            "device": self.device.type,
            "torch": torch.__version__,
        }
        root = self.cache_config["dir"] or default_cache_dir() / "teacher"
        cache = TeacherCache(root, full, identity["n_train"], self.cache_config["max_gb"])
        log.info("teacher cache: %s", cache.dir)
        return cache

    def on_train_epoch_start(self) -> None:
        self._cache_epoch = None
        if self.teacher_cache is None:
            return
        # The loader's EpochSampler must be at this epoch (Lightning's set_epoch), or the
        # (epoch, index) keys would name other images.
        # Under DDP Lightning wraps the sampler (each rank a shard, the inner epoch never set).
        sampler = getattr(self.trainer.train_dataloader, "sampler", None)
        sampler_epoch = sampler.epoch if isinstance(sampler, EpochSampler) else None
        if sampler_epoch != self.current_epoch or self.trainer.world_size > 1:
            log.warning(
                "teacher cache off: the training sampler is %s at epoch %r, the trainer at epoch "
                "%d with %d process(es) (expected the deterministic stream's EpochSampler, one "
                "process); using the live teacher",
                type(sampler).__name__,
                sampler_epoch,
                self.current_epoch,
                self.trainer.world_size,
            )
            self.teacher_cache = None
            return
        names = [LOGITS] + [f"feat.{n}" for n in self._teacher_layers()]
        self._cache_epoch = self.teacher_cache.epoch(self.current_epoch, names)

    def on_train_epoch_end(self) -> None:
        if self._cache_epoch is not None:
            self._cache_epoch.commit()
            stats = self.teacher_cache.stats if self.teacher_cache is not None else {}
            log.info(
                "teacher cache: epoch %d, %s batches from the cache, %s live",
                self.current_epoch,
                stats.get("hit_batches"),
                stats.get("live_batches"),
            )
        self._cache_epoch = None

    def teardown(self, stage: str) -> None:
        # An interrupted epoch's outputs are never committed.
        if self._cache_epoch is not None:
            self._cache_epoch.abort()
            self._cache_epoch = None

    def _teacher_layers(self) -> tuple[str, ...]:
        hooks = getattr(self, "teacher_hooks", None)
        return hooks.names if hooks is not None else ()

    def _teacher_outputs(
        self, images: torch.Tensor, indices: torch.Tensor | None
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """The frozen teacher's logits and hooked maps for this batch: from the cache when every
        one of them is there, else a live forward under no_grad (which then fills the cache)."""
        view = self._cache_epoch if indices is not None else None
        if view is not None:
            cached = view.lookup(indices, images.device)
            if cached is not None:
                features = {n: cached[f"feat.{n}"] for n in self._teacher_layers()}
                return cached[LOGITS], features
        with torch.no_grad():
            teacher_logits = self.teacher(self._layout(images))
        features = self.teacher_hooks.features if self._teacher_layers() else {}
        if view is not None:
            outputs = {f"feat.{n}": features[n] for n in self._teacher_layers()}
            view.store(indices, {LOGITS: teacher_logits, **outputs})
        return teacher_logits, features

    def train(self, mode: bool = True) -> DistillModule:
        super().train(mode)
        self.teacher.eval()  # BatchNorm statistics and dropout of the teacher never change
        return self

    def trainable_modules(self) -> nn.Module:
        # The student and the methods' learned parts (connectors, embedding heads); no teacher.
        return nn.ModuleList([self.model, self.methods])

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        images, targets, indices = _unpack(batch)
        teacher_logits, teacher_features = self._teacher_outputs(images, indices)
        logits = self(images)
        terms = {"ce": self.cross_entropy(logits, targets)}
        weighted = [self.ce_weight * terms["ce"]]
        for pair in self.pairs:
            name = f"nst_{pair['student']}"
            terms[name] = self.nst(
                self.student_hooks.features[pair["student"]],
                teacher_features[pair["teacher"]],
            )
            weighted.append(float(pair["weight"]) * terms[name])
        if self.kd_weight:
            terms["kd"] = self.kd(logits, teacher_logits)
            weighted.append(self.kd_weight * terms["kd"])
        if self.methods:
            inputs = DistillInputs(
                student=self.student_hooks.features if self.hooks else {},
                teacher=teacher_features,
                logits_s=logits,
                logits_t=teacher_logits,
                # A hidden label (data.labeled_fraction < 1) becomes the teacher's prediction
                # for the methods that need a class (DKD's target, CRD's other-class negatives).
                targets=torch.where(targets == -100, teacher_logits.argmax(dim=1), targets),
                indices=indices,
                epoch=int(self.current_epoch),
            )
            for key, method in self.methods.items():
                if method.requires_index and indices is None:
                    raise ValueError(
                        f"module.methods.{key} ({type(method).__name__}) needs each sample's "
                        "dataset index, but the batch is (images, targets); set "
                        "data.return_index=true"
                    )
                for term, (weight, value) in method.terms(inputs).items():
                    name = f"{key}_{term}" if term else key
                    terms[name] = value
                    weighted.append(weight * value)
        self.clear_features()
        loss = torch.stack(weighted).sum()
        self.log_dict({f"train/{k}": v for k, v in terms.items()}, on_step=False, on_epoch=True)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        return loss

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def clear_features(self) -> None:
        for hooks in self.hooks:
            hooks.clear()

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        super().validation_step(tuple(batch[:2]), batch_idx)  # a dataset index is not needed here

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        super().test_step(tuple(batch[:2]), batch_idx)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        # Evaluation runs only the student; its hooks still fire, so drop what they caught.
        self.clear_features()

    def on_test_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self.clear_features()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if not self.keep_teacher:
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("teacher.")]:
                del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A checkpoint saved without the teacher gets the teacher this module already loaded.
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)


_RESERVED_KEYS = ("ce", "kd", "loss")


def _check_methods(methods: Mapping[str, Any] | None) -> dict[str, DistillMethod]:
    if methods is None:
        return {}
    if not isinstance(methods, Mapping):
        raise ValueError(
            f"module.methods={methods!r}: expected a mapping name -> method built by _target_"
        )
    out = {}
    for key, method in methods.items():
        if not isinstance(method, DistillMethod):
            raise ValueError(
                f"module.methods.{key}={method!r}: expected a method built by _target_ "
                "(kd_lightning.distill.FitNetsLoss, ATLoss, DKDLoss, RKDLoss or CRDLoss)"
            )
        if not str(key).isidentifier() or key in _RESERVED_KEYS or str(key).startswith("nst_"):
            raise ValueError(
                f"module.methods key {key!r}: expected an identifier other than "
                f"{', '.join(_RESERVED_KEYS)} and nst_* (it names the logged terms)"
            )
        out[str(key)] = method
    return out


def _check_cache_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """teacher_cache (conf/config.yaml): {enabled: bool, dir: path or null, max_gb: number >= 0}."""
    out = {"enabled": False, "dir": None, "max_gb": 4.0}
    if config is None:
        return out
    if not isinstance(config, Mapping) or set(config) - set(out):
        raise ValueError(
            f"teacher_cache={config!r}: expected a mapping with keys enabled, dir, max_gb"
        )
    out.update(config)
    if not isinstance(out["enabled"], bool):
        raise ValueError(f"teacher_cache.enabled={out['enabled']!r}: expected true/false")
    max_gb = out["max_gb"]
    if isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb >= 0:
        raise ValueError(f"teacher_cache.max_gb={max_gb!r}: expected a number >= 0")
    out["dir"] = Path(out["dir"]).expanduser() if out["dir"] else None
    return out


def _check_module_weight(key: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (ok and math.isfinite(value) and value >= 0):
        raise ValueError(f"module.{key}={value!r}: expected a finite number >= 0")


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(images, targets) or (images, targets, dataset indices)."""
    if len(batch) == 3:
        return batch[0], batch[1], batch[2]
    images, targets = batch
    return images, targets, None
