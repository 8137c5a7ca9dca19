"""InitFromPretrained: start a fresh run from pretrained dense weights, pruned one-shot."""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from typing_extensions import override

from slope_lightning.callbacks.shared import first_non_finite, info
from slope_lightning.checkpoints import (
    CheckpointError,
    load_checkpoint_file,
    load_safetensors_file,
    safetensors_rows,
)
from slope_lightning.models import TransformerConfig
from slope_lightning.models.pretrained import (
    DEFAULT_CACHE_DIR,
    PRETRAINED,
    held_out_perplexity,
    load_pretrained,
)
from slope_lightning.sparse import SparseLinear, densify, sparse_layers, sparsify
from slope_lightning.sparse.calibration import collect_input_norms, wanda_sparsify
from slope_lightning.sparse.dense_rows import (
    DenseRows,
    StateDictRows,
    check_dense_rows,
    is_on_meta,
)

logger = logging.getLogger(__name__)


class InitFromPretrained(Callback):
    """Start a fresh run from pretrained dense weights: the sparse layers take their masks and
    values from them (one-shot Wanda or magnitude pruning), everything else is copied.

    In ``setup`` of a fit, before the optimizer is built: a dense twin of the module's model
    (``pl_module.<attribute>``, SparseLinear layers made ``nn.Linear``) receives the
    pretrained weights; each layer that is sparse in the model is pruned on the twin with
    the layer's N:M pattern (Wanda on ``calibration_batches`` training batches, or
    magnitude), and the twin's state is loaded into the model, so the model keeps its
    layers, backends and any sharding hooks set up later. A dense model (the baseline run)
    simply gets the weights. A sparse layer made from a transformers ``Conv1D`` (GPT-2) takes
    its dense weight in the Conv1D layout, (d_in, d_out), as the pretrained checkpoint stores
    it; the twin holds it as an ``nn.Linear`` (transposed), which computes the same function.
    With ``eval_batches`` > 0 the held-out perplexity of the dense
    twin and of the one-shot pruned twin are measured on that many validation batches and
    logged (``pretrained/dense_ppl``, ``pretrained/one_shot_ppl``, at step 0), so one run
    reports dense, one-shot and, through the module's own validation, continued SLoPe.

    A model still on the meta device (``SLoPeModule(meta_init=True)``, e.g. under FSDP2) is
    loaded by rows instead: at setup the source's keys and shapes are checked against the
    meta model (nothing is read) and handed to the module
    (:meth:`~slope_lightning.module.SLoPeModule.initialise_from`), whose ``configure_model``
    then, after sharding, has each rank read only its rows of each tensor (a
    ``.safetensors`` file is read slice by slice) and prune its rows of each sparse layer by
    magnitude; M_C comes from the sharded refresh. Parameters and masks are bit for bit
    those of the ordinary build with ``mask_method="magnitude"``. A named source is
    dequantised whole on each rank first (save it as ``.safetensors`` to read only rows).
    Magnitude masks only, no ``eval_batches`` (both need the whole dense model) and no
    ``.ckpt`` (pass the run's ``export/model.safetensors``): refused at setup.

    A resumed run pays the loading once more and then the checkpoint replaces it all.

    Args:
        source: a name of :data:`~slope_lightning.models.pretrained.PRETRAINED`
            (``"smollm2-135m"``: the module's model must be a Transformer of that preset's
            shape, e.g. ``SLoPeModule(preset="smollm2-135m")``), or a file of dense weights in
            the model's own names: ``.safetensors``, or a Lightning ``.ckpt`` of a dense run
            (its ``state_dict`` below ``<attribute>.``).
        mask_method: "wanda" (|W|·‖X‖, for pretrained weights) or "magnitude".
        calibration_batches: training batches Wanda's norms are collected over.
        eval_batches: validation batches for the before / after pruning perplexities (0: skip).
        attribute: the LightningModule attribute holding the model.
        cache_dir: where named checkpoints are cached.

    Raises:
        ValueError: a bad argument; at setup, weights that do not fit the model (the message
            names the keys, or the first key of another shape with both shapes), or layers
            of different N:M patterns.
        FileNotFoundError: at setup, ``source`` names a missing file.
        CheckpointError: at setup, a file that is truncated or corrupt, a ``.ckpt`` that
            holds pickled objects (refused, never run) or no ``state_dict`` under
            ``<attribute>.``, or weights with NaN/inf (the message names the key).

    With a meta model: ValueError at setup for Wanda masks, ``eval_batches`` > 0, a ``.ckpt``
    source or a module without ``initialise_from`` (each message names the fix), or weights
    that do not fit; in ``configure_model``, weights with NaN/inf (the key named, raised on
    every rank).
    """

    def __init__(
        self,
        source: str = "smollm2-135m",
        mask_method: Literal["wanda", "magnitude"] = "wanda",
        calibration_batches: int = 8,
        eval_batches: int = 0,
        attribute: str = "model",
        cache_dir: str = DEFAULT_CACHE_DIR,
    ) -> None:
        if mask_method not in ("wanda", "magnitude"):
            raise ValueError(
                f"InitFromPretrained(mask_method={mask_method!r}): choose 'wanda' or 'magnitude'"
            )
        for label, value, low in (
            ("calibration_batches", calibration_batches, 1),
            ("eval_batches", eval_batches, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"InitFromPretrained({label}={value!r}): give an int >= {low}")
        if source not in PRETRAINED and not source.endswith((".safetensors", ".ckpt")):
            raise ValueError(
                f"InitFromPretrained(source={source!r}): give one of {sorted(PRETRAINED)}, a "
                ".safetensors file or a Lightning .ckpt"
            )
        self.source = source
        self.mask_method = mask_method
        self.calibration_batches = calibration_batches
        self.eval_batches = eval_batches
        self.attribute = attribute
        self.cache_dir = cache_dir
        self.metrics: dict[str, float] = {}

    def _dense_state(self, model: nn.Module) -> dict[str, Tensor]:
        if self.source in PRETRAINED:
            return self._pretrained_state(model)
        if self.source.endswith(".safetensors"):
            return load_safetensors_file(self.source)  # FileNotFoundError / CheckpointError
        checkpoint = load_checkpoint_file(self.source)  # weights_only; refuses pickled objects
        state = checkpoint.get("state_dict")
        prefix = f"{self.attribute}."
        if not isinstance(state, dict) or not any(str(k).startswith(prefix) for k in state):
            found = sorted(state)[:3] if isinstance(state, dict) else None
            raise CheckpointError(
                f"InitFromPretrained(source={self.source!r}): the checkpoint has no weights "
                f"under {prefix!r} in its state_dict (found {found}); pass a Lightning .ckpt "
                "of a dense run of this module, or set attribute= to where its model lives"
            )
        return {
            key[len(prefix) :]: value
            for key, value in state.items()
            if key.startswith(prefix) and isinstance(value, Tensor)
        }

    def _pretrained_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The named checkpoint's weights, checked to be of ``model``'s shape."""
        config = getattr(model, "config", None)
        if not isinstance(config, TransformerConfig):
            raise ValueError(
                f"InitFromPretrained(source={self.source!r}) loads into the project's "
                f"Transformer, but {self.attribute} is a {type(model).__name__}"
            )
        pretrained, _ = load_pretrained(self.source, config.seq_len, self.cache_dir)
        if pretrained.config != config:
            raise ValueError(
                f"InitFromPretrained(source={self.source!r}): the checkpoint is "
                f"{pretrained.config}, the model is {config}; use "
                f"preset={PRETRAINED[self.source].preset!r} without shape overrides"
            )
        return pretrained.state_dict()

    def meta_init_refusal(self) -> str | None:
        """Why these settings cannot load into a meta model (``model.meta_init``), and the fix;
        None if they can. The CLI asks before anything is built."""
        fix = (
            "use mask_method='magnitude' with model.meta_init: true, or set model.meta_init: false"
        )
        if self.mask_method == "wanda":
            return f"mask_method='wanda' needs the whole dense model's activations; {fix}"
        if self.eval_batches > 0:
            return (
                f"eval_batches={self.eval_batches} measures the whole dense model; set "
                "eval_batches: 0, or set model.meta_init: false"
            )
        if self.source.endswith(".ckpt"):
            return (
                "a Lightning .ckpt is not read by rows; pass the run's export/model.safetensors "
                "(every fit writes one), or set model.meta_init: false"
            )
        if self.attribute != "model":
            return (
                f"attribute={self.attribute!r}: SLoPeModule.initialise_from loads its model "
                "attribute; use attribute='model', or set model.meta_init: false"
            )
        return None

    def _hand_over(self, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """A meta model: check the source against it (reading no data) and hand it to the
        module, which loads each rank's rows when it materialises the model."""
        refusal = self.meta_init_refusal()
        if refusal is not None:
            raise ValueError(
                f"InitFromPretrained(source={self.source!r}) into a model on the meta device "
                f"(meta_init): {refusal}"
            )
        initialise_from = getattr(pl_module, "initialise_from", None)
        if not callable(initialise_from):
            raise ValueError(
                f"InitFromPretrained: {self.attribute} is on the meta device, but "
                f"{type(pl_module).__name__} has no initialise_from(rows) to load it by rows; "
                "use SLoPeModule(meta_init=True), or build the model on a real device"
            )
        rows: DenseRows
        if self.source in PRETRAINED:
            rows = StateDictRows(self._pretrained_state(model), name=self.source)
        else:
            rows = safetensors_rows(self.source)  # FileNotFoundError / CheckpointError
        check_dense_rows(model, rows)
        initialise_from(rows)
        info(
            logger,
            "InitFromPretrained: %s handed to %s, loaded by rows (each rank its own, pruned by "
            "magnitude) when the model is materialised",
            self.source,
            type(pl_module).__name__,
        )

    def _check_weights(self, state: Mapping[str, Tensor], twin: nn.Module) -> None:
        """Refuse weights with NaN/inf (as every save path does) and weights whose shapes
        are not the model's, naming the first such key."""
        bad = first_non_finite(state.items())
        if bad is not None:
            raise CheckpointError(
                f"InitFromPretrained(source={self.source!r}): refusing non-finite weights: "
                f"{bad}; use a checkpoint saved before training diverged"
            )
        expected = twin.state_dict()
        for key, value in state.items():
            target = expected.get(key)
            if isinstance(target, Tensor) and target.shape != value.shape:
                raise ValueError(
                    f"InitFromPretrained(source={self.source!r}) does not fit "
                    f"{self.attribute}: {key} is {tuple(value.shape)} in the file but "
                    f"{tuple(target.shape)} in the model; pass weights of this model's shape "
                    "(its preset and model_overrides)"
                )

    def _batches(self, trainer: pl.Trainer, which: str, count: int) -> list[Any]:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not is_overridden(f"{which}_dataloader", datamodule):
            raise ValueError(
                f"InitFromPretrained needs the datamodule's {which}_dataloader() for "
                f"{'calibration' if which == 'train' else 'evaluation'}; fit with a datamodule"
            )
        return list(itertools.islice(getattr(datamodule, f"{which}_dataloader")(), count))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = getattr(pl_module, self.attribute)
        if is_on_meta(model):
            self._hand_over(pl_module, model)
            return
        layers = sparse_layers(model)
        state = _in_linear_layout(self._dense_state(model), layers)
        twin = copy.deepcopy(model)
        densify(twin)  # every SparseLinear an nn.Linear, Conv1D-made ones included
        self._check_weights(state, twin)
        missing, unexpected = twin.load_state_dict(state, strict=False)
        # A tied head is stored once (safetensors keeps no aliases): missing, but loaded.
        params = dict(twin.named_parameters(remove_duplicate=False))
        loaded = {id(params[key]) for key in state if key in params}
        missing = [
            key
            for key in missing
            if not key.endswith("_extra_state") and id(params.get(key)) not in loaded
        ]
        if missing or unexpected:
            raise ValueError(
                f"InitFromPretrained({self.source!r}) does not fit {self.attribute}: missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}"
            )
        twin.to(trainer.strategy.root_device)
        val = self._batches(trainer, "val", self.eval_batches) if self.eval_batches else []
        if val:
            self.metrics["pretrained/dense_ppl"] = held_out_perplexity(twin, val)
        if layers:
            patterns = {(layer.n, layer.m) for _, layer in layers}
            if len(patterns) > 1:
                raise ValueError(f"InitFromPretrained: layers of several N:M patterns {patterns}")
            (n, m) = patterns.pop()
            names = [name for name, _ in layers]
            if self.mask_method == "wanda":
                batches = self._batches(trainer, "train", self.calibration_batches)
                norms = collect_input_norms(twin, batches, layers=names)
                wanda_sparsify(twin, norms, n, m, include=names, exclude=())
            else:
                sparsify(twin, n, m, include=names, exclude=())
            if val:
                self.metrics["pretrained/one_shot_ppl"] = held_out_perplexity(twin, val)
        model.load_state_dict(twin.state_dict())  # masks, values and the dense weights
        info(
            logger,
            "InitFromPretrained: %s loaded into %s (%d layers pruned one-shot by %s)%s",
            self.source,
            self.attribute,
            len(layers),
            self.mask_method,
            "".join(f", {key} {value:.2f}" for key, value in self.metrics.items()),
        )
        if self.metrics and trainer.is_global_zero:
            for run_logger in trainer.loggers:
                run_logger.log_metrics(self.metrics, step=0)


def _in_linear_layout(
    state: Mapping[str, Tensor], layers: list[tuple[str, SparseLinear]]
) -> dict[str, Tensor]:
    """``state`` with the dense weight of every sparse layer made from a transformers Conv1D
    (stored (d_in, d_out)) transposed to (d_out, d_in), the layout of the ``nn.Linear`` that
    :func:`~slope_lightning.sparse.densify` puts in its place."""
    converted = dict(state)
    for name, layer in layers:
        key = f"{name}.weight"
        if layer.weight_layout == "conv1d" and key in converted:
            converted[key] = converted[key].t()
    return converted
