"""Client helpers: the unlearning side of the protocol added to your own ClientApp in one call.

::

    from flwr.clientapp import ClientApp
    from fed_unlearn.flower import add_unlearning

    app = ClientApp()

    @app.train()
    def train(msg, context): ...          # your own training, unchanged

    @app.evaluate()
    def evaluate(msg, context): ...       # your own evaluation, unchanged

    add_unlearning(app, model_fn=lambda context: Net(),
                   data_fn=lambda context: load_data(context.node_config["partition-id"],
                                                     context.node_config["num-partitions"]))

``add_unlearning`` registers every handler of :mod:`fed_unlearn.protocol` except your
``train`` and ``evaluate``: ``query.identify``, ``query.info``, ``query.forget`` (the
deletion request: which samples to forget, chosen on the node), ``train.retain``
(training without the deleted samples), ``train.unlearn`` (the methods' local routines:
SRAGU, gradient ascent, PGA, IEU, AMUN, TRW), ``query.calibrate`` (the step's scale, on the
node's own data), ``query.support`` (its label counts, when another client departs),
``query.relearn``, ``evaluate.audit`` (the leakage measurements),
``train.reference`` (the strong audit's reference models) and ``query.erasure`` (a deployed
site's inbox). The data never leaves the node: replies carry models, counts, digests and,
for the strong audit, one attack score per forget or held-out sample.

``model_fn(context)`` returns a fresh torch model of your architecture; ``data_fn(context)``
returns ``(train, held_out)``, each an :class:`~fed_unlearn.data.ArrayDataset`, an
``(x, y)`` pair of arrays or tensors, a torch ``Dataset`` or a ``DataLoader`` (items
``(x, y)`` or dicts such as ``{"img": ..., "label": ...}``). Training on retained data
uses ``train_fn`` (default: minibatch SGD with the run config's ``local-epochs``,
``batch-size``, ``lr``, ``momentum``, ``weight-decay``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .. import protocol as P
from ..attacks import client_reference_masks
from ..calibration import Measurement, client_stats
from ..data import ArrayDataset
from ..deletion import MODEL_SELECTIONS, forget_mask, mask_digest, selection_scores
from ..evaluation import attack_scores_client, measure_client
from ..metrics import cross_entropy
from ..training import TrainSettings, client_seed, predict_logits, relearn_steps, train_local
from ..unlearning import METHODS, RoutineInput, client_routine, config_from_run_config
from .backends import ArrayBackend, FitFn, PredictFn, TorchBackend
from .records import number, to_weights
from .wire import (
    NodeData,
    calibrate_reply,
    forget_reply,
    forget_request,
    identify_reply,
    info_reply,
    read_calibrate_request,
    read_forget_request,
    read_identify_request,
    read_relearn_request,
    relearn_reply,
    support_reply,
)

#: Node-state keys the helpers use (the node's own state, persisted by Flower between messages).
MASK_KEY = "fed-unlearn.forget-mask"
REQUEST_KEY = "fed-unlearn.request"
LAST_LOCAL_KEY = "fed-unlearn.last-local"
LAST_LOCAL_N_KEY = "fed-unlearn.last-local-n"

ModelFn = Callable[[Context], torch.nn.Module]
DataFn = Callable[[Context], tuple[Any, Any]]
#: ``train_fn(model, data, instruction, context) -> metrics``: trains ``model`` in place on ``data``.
TrainFn = Callable[[torch.nn.Module, ArrayDataset, Mapping[str, Any], Context], Mapping[str, Any]]

_X_KEYS = ("img", "image", "images", "x", "input", "inputs", "features", "pixel_values")
_Y_KEYS = ("label", "labels", "y", "target", "targets", "fine_label")


# -- data -------------------------------------------------------------------------------------
def _np(v: Any) -> np.ndarray:
    return v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)


def _pair(item: Any, source: str) -> tuple[Any, Any]:
    if isinstance(item, Mapping):
        xk = next((k for k in _X_KEYS if k in item), None)
        yk = next((k for k in _Y_KEYS if k in item), None)
        if xk is None or yk is None:
            raise ValueError(
                f"{source}: items are dicts with keys {sorted(item)}; expected an input key "
                f"({', '.join(_X_KEYS)}) and a label key ({', '.join(_Y_KEYS)})"
            )
        return item[xk], item[yk]
    if isinstance(item, (tuple, list)) and len(item) >= 2:
        return item[0], item[1]
    raise ValueError(f"{source}: expected (x, y) items or dicts, got {type(item).__name__}")


def as_dataset(obj: Any, source: str = "data") -> ArrayDataset:
    """Materialise a client's data as an :class:`ArrayDataset` (float32 inputs, int64 labels).

    Accepts an ArrayDataset, an ``(x, y)`` pair, a torch ``Dataset`` or an iterable of
    batches (a ``DataLoader``) yielding ``(x, y)`` or dicts.

    Raises
    ------
    ValueError
        If the labels are not integers >= 0 or the shapes do not match, naming ``source``.
    """
    if isinstance(obj, ArrayDataset):
        return obj
    if isinstance(obj, (tuple, list)) and len(obj) == 2 and not isinstance(obj[0], (tuple, list, Mapping)):
        x, y = _np(obj[0]), _np(obj[1])
    elif isinstance(obj, torch.utils.data.DataLoader) or (hasattr(obj, "__iter__") and not hasattr(obj, "__getitem__")):
        xs, ys = [], []
        for batch in obj:
            bx, by = _pair(batch, source)
            xs.append(_np(bx))
            ys.append(_np(by).reshape(-1))
        if not xs:
            raise ValueError(f"{source} is empty")
        x, y = np.concatenate(xs), np.concatenate(ys)
    elif hasattr(obj, "__getitem__") and hasattr(obj, "__len__"):
        items = [_pair(obj[i], source) for i in range(len(obj))]
        if not items:
            raise ValueError(f"{source} is empty")
        x = np.stack([_np(a) for a, _ in items])
        y = np.asarray([int(_np(b)) for _, b in items])
    else:
        raise ValueError(f"{source}: cannot read {type(obj).__name__} (give arrays, a Dataset or a DataLoader)")
    if len(x) != len(y):
        raise ValueError(f"{source}: {len(x)} inputs but {len(y)} labels")
    if len(y) and (not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0) or y.min() < 0):
        raise ValueError(f"{source}: labels must be integers >= 0")
    y = y.astype(np.int64)
    return ArrayDataset(np.ascontiguousarray(x, dtype=np.float32), y, int(y.max()) + 1 if len(y) else 0, source)


# -- run-config helpers --------------------------------------------------------------------------
def train_settings(run_config: Mapping[str, Any], instruction: Mapping[str, Any] | None = None) -> TrainSettings:
    """Local SGD settings from the run config: ``local-epochs``, ``batch-size``, ``lr``, ``momentum``, ``weight-decay``.

    ``local-epochs-ratio`` in the instruction runs ``max(1, round(r E))`` epochs (FedEraser's calibration).
    """
    d = TrainSettings()
    epochs = int(run_config.get("local-epochs", d.epochs))
    if instruction is not None and P.LOCAL_EPOCHS_RATIO in instruction:
        epochs = max(1, int(np.floor(float(instruction[P.LOCAL_EPOCHS_RATIO]) * epochs + 0.5)))
    return TrainSettings(
        epochs,
        int(run_config.get("batch-size", d.batch_size)),
        float(run_config.get("lr", d.lr)),
        float(run_config.get("momentum", d.momentum)),
        float(run_config.get("weight-decay", d.weight_decay)),
    )


def node_client_id(context: Context) -> int:
    """This node's client id: its ``partition-id`` node-config value, else its node id."""
    value = context.node_config.get("partition-id", context.node_id)
    try:
        return int(value)
    except (TypeError, ValueError):
        return int(context.node_id)


def default_train(
    model: torch.nn.Module, data: ArrayDataset, instruction: Mapping[str, Any], context: Context
) -> dict[str, Any]:
    """Minibatch SGD on ``data`` (the project's local training), seeded by run seed, round and client.

    Honours the protocol's optional keys: ``local-epochs-ratio``, ``seed-round`` (replay the
    minibatch order of another round), ``augment`` (from the server; off when replaying),
    and the run config's ``fastclip.bound`` / ``fastclip.every``.
    """
    rc = context.run_config
    replay = P.SEED_ROUND in instruction
    rnd = int(instruction.get(P.SEED_ROUND, instruction.get(P.SERVER_ROUND, 0)))
    augment = "none" if replay else str(instruction.get(P.AUGMENT, "none"))
    stats = train_local(
        model,
        data.x,
        data.y,
        train_settings(rc, instruction),
        seed=client_seed(int(rc.get("seed", 0)), rnd, node_client_id(context)),
        augment=augment,
        clip_bound=float(rc.get("fastclip.bound", 0.0)),
        clip_every=int(rc.get("fastclip.every", 50)),
    )
    return {"train-loss": stats.mean_loss, "train-steps": stats.steps}


# -- handlers ----------------------------------------------------------------------------------
class _Helper:
    """The handlers of one ClientApp (bound to its model backend and data function)."""

    def __init__(self, backend: TorchBackend | ArrayBackend, data_fn: DataFn, handlers: list[str]) -> None:
        self.backend, self.data_fn = backend, data_fn
        self.handlers = handlers

    # data and model ------------------------------------------------------------------------
    def data(self, context: Context) -> tuple[ArrayDataset, ArrayDataset]:
        got = self.data_fn(context)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ValueError("data_fn must return (train, held_out)")
        return as_dataset(got[0], "train data"), as_dataset(got[1], "held-out data")

    def model(self, record: ArrayRecord, context: Context) -> Any:
        return self.backend.load(record, context)

    @staticmethod
    def arrays(msg: Message, key: str | None = None) -> ArrayRecord:
        recs = msg.content.array_records
        if key is not None:
            return recs[key]
        if P.ROLE_KEYS["retain"][0] in recs:
            return recs[P.ROLE_KEYS["retain"][0]]
        if len(recs) != 1:
            raise ValueError(f"expected one model in the message, got {sorted(recs)}")
        return next(iter(recs.values()))

    @staticmethod
    def array_key(msg: Message) -> str:
        recs = [
            k
            for k in msg.content.array_records
            if k != P.REFERENCE_RECORD and not k.startswith(P.REFERENCE_MODEL_PREFIX)
        ]
        return recs[0] if recs else P.ROLE_KEYS["retain"][0]

    @staticmethod
    def config(msg: Message) -> Mapping[str, Any]:
        recs = msg.content.config_records
        return (
            dict(recs[P.CONFIG_RECORD])
            if P.CONFIG_RECORD in recs
            else (dict(next(iter(recs.values()))) if recs else {})
        )

    @staticmethod
    def mask(context: Context, data: ArrayDataset, instruction: Mapping[str, Any]) -> np.ndarray | None:
        """This node's deletion mask: all ``True`` for ``forget-all``, else the one ``query.forget`` recorded."""
        if bool(instruction.get(P.FORGET_ALL, False)):
            return np.ones(len(data), bool)
        if MASK_KEY in context.state.array_records:
            mask = context.state.array_records[MASK_KEY]["mask"].numpy().astype(bool)
            if mask.shape == (len(data),):
                return mask
            raise ValueError(
                f"the stored deletion mask covers {len(mask)} samples but the node has {len(data)}: "
                "its data changed since the deletion request"
            )
        return None

    @staticmethod
    def removed_classes(context: Context) -> tuple[int, ...]:
        if REQUEST_KEY in context.state.config_records:
            req = context.state.config_records[REQUEST_KEY]
            if req.get("scenario") == "class":
                return (int(str(req["class"])),)
        return ()

    def part(self, context: Context, data: ArrayDataset, which: str, instruction: Mapping[str, Any]) -> ArrayDataset:
        if which == "all":
            return data
        mask = self.mask(context, data, instruction)
        if mask is None:
            raise RuntimeError(f"'{which}' data asked before a deletion request ({P.FORGET}) reached this node")
        idx = np.flatnonzero(mask if which == "forget" else ~mask)
        if len(idx) == 0:
            raise ValueError(f"this node's '{which}' part is empty")
        return data.subset(idx)

    def _train(self, model: Any, data: ArrayDataset, instruction: Mapping[str, Any], context: Context) -> MetricRecord:
        t0 = time.perf_counter()
        values = self.backend.fit(model, data, instruction, context)
        values.setdefault("train-seconds", time.perf_counter() - t0)
        return MetricRecord(
            {
                **{k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
                P.NUM_EXAMPLES: len(data),
            }
        )

    def _keep_last(self, context: Context, model: Any, n: int) -> None:
        context.state[LAST_LOCAL_KEY] = self.backend.record(model)
        context.state[LAST_LOCAL_N_KEY] = MetricRecord({P.NUM_EXAMPLES: int(n)})

    # handlers ------------------------------------------------------------------------------
    def identify(self, msg: Message, context: Context) -> Message:
        keys = read_identify_request(self.config(msg))
        ident = {k: context.node_config[k] for k in keys if k in context.node_config}
        caps = {
            P.PROTOCOL: P.VERSION,
            P.HANDLERS: list(self.handlers),
            P.ROUTINES: sorted(n for n, c in METHODS.items() if c.client_routine is not None),
        }
        return Message(identify_reply(ident, caps), reply_to=msg)

    def info(self, msg: Message, context: Context) -> Message:
        train, heldout = self.data(context)
        check = "ok"
        if self.backend.torch:
            model = self.backend.fresh(context)
            if msg.content.array_records:
                check = architecture_mismatch(model, self.arrays(msg)) or "ok"
            classes = self.backend.num_classes(model, train.x)
        elif msg.content.array_records:
            classes = self.backend.num_classes(self.model(self.arrays(msg), context), train.x)
        else:
            classes = int(max(train.num_classes, heldout.num_classes))
        data = NodeData(len(train), len(heldout), int(classes), tuple(int(s) for s in train.input_shape), check)
        return Message(info_reply(data), reply_to=msg)

    def forget(self, msg: Message, context: Context) -> Message:
        cfg = self.config(msg)
        request, seed = read_forget_request(cfg)
        train, heldout = self.data(context)
        model = self.model(self.arrays(msg), context) if msg.content.array_records else None
        mask = forget_mask(
            request,
            node_client_id(context),
            train.x,
            train.y,
            seed if seed is not None else int(context.run_config.get("seed", 0)),
            model=model,
            heldout=(heldout.x, heldout.y),
        )
        context.state[MASK_KEY] = ArrayRecord({"mask": Array(mask.astype(np.uint8))})
        context.state[REQUEST_KEY] = forget_request(request)
        return Message(forget_reply(int(mask.sum()), int((~mask).sum()), mask_digest(mask)), reply_to=msg)

    def train_all(self, msg: Message, context: Context) -> Message:
        return self._train_reply(msg, context, "all")

    def train_retain(self, msg: Message, context: Context) -> Message:
        return self._train_reply(msg, context, "retain")

    def _train_reply(self, msg: Message, context: Context, which: str) -> Message:
        cfg = self.config(msg)
        train, _ = self.data(context)
        return self._trained(msg, context, self.part(context, train, which, cfg), cfg)

    def _trained(self, msg: Message, context: Context, data: ArrayDataset, cfg: Mapping[str, Any]) -> Message:
        """Train the message's model on ``data``; the reply a training message expects."""
        model = self.model(self.arrays(msg), context)
        metrics = self._train(model, data, cfg, context)
        if bool(cfg.get(P.KEEP_LAST_LOCAL, False)):
            self._keep_last(context, model, len(data))
        return Message(RecordDict({self.array_key(msg): self.backend.record(model), "metrics": metrics}), reply_to=msg)

    def train_reference(self, msg: Message, context: Context) -> Message:
        """A round of reference federation ``reference-index``: train on that reference's half of the samples."""
        cfg = self.config(msg)
        train, _ = self.data(context)
        index = int(cfg[P.REFERENCE_INDEX])
        return self._trained(
            msg, context, train.subset(np.flatnonzero(self.reference_masks(context, len(train), cfg)[index])), cfg
        )

    @staticmethod
    def reference_masks(context: Context, n: int, cfg: Mapping[str, Any]) -> np.ndarray:
        count, index = int(cfg[P.REFERENCE_COUNT]), int(cfg.get(P.REFERENCE_INDEX, 0))
        if not 0 <= index < count:
            raise ValueError(f"reference index {index} out of range for {count} reference models")
        return client_reference_masks(n, count, int(cfg[P.REFERENCE_SEED]), node_client_id(context))

    def unlearn(self, msg: Message, context: Context) -> Message:
        cfg = self.config(msg)
        roles = [r.strip() for r in str(cfg.get(P.ROLES_KEY, "forget")).split(",") if r.strip()]
        bad = sorted(set(roles) - set(P.ROLES))
        if bad or not roles:
            raise ValueError(f"unknown role(s) {bad or roles}; valid: {', '.join(P.ROLES)}")
        train, heldout_all = self.data(context)
        record = self.arrays(msg)
        out: dict[str, Any] = {}
        for role in roles:
            akey, mkey = P.ROLE_KEYS[role]
            if role == "retain":
                model = self.model(record, context)
                metrics = self._train(model, self.part(context, train, "retain", cfg), cfg, context)
            else:
                model, metrics = self._forget_role(record, train, heldout_all, cfg, context)
            out[akey], out[mkey] = self.backend.record(model), metrics
        return Message(RecordDict(out), reply_to=msg)

    def _forget_role(
        self,
        record: ArrayRecord,
        train: ArrayDataset,
        heldout_all: ArrayDataset,
        cfg: Mapping[str, Any],
        context: Context,
    ) -> tuple[Any, MetricRecord]:
        forget = self.part(context, train, "forget", cfg)
        model = self.model(record, context)
        name = str(cfg.get(P.METHOD, ""))
        if name not in METHODS or METHODS[name].client_routine is None:
            # a method without a client routine (PUF for samples): ordinary training on the forget set
            return model, self._train(model, forget, cfg, context)
        if not self.backend.torch:
            raise ValueError(
                f"method '{name}' runs a client routine on a torch model: add_unlearning(app, model_fn=...) adds it"
            )
        routine = client_routine(name)
        settings = config_from_run_config(METHODS[name].config_class, cfg, name)
        mask = self.mask(context, train, cfg)
        retain = train.subset(np.flatnonzero(~mask)) if mask is not None and (~mask).any() else None
        # the routines' reference for "unseen": held-out samples like the forget set (as calibration's)
        try:
            heldout = heldout_all.subset(self._heldout_like(model, context, forget, heldout_all))
        except ValueError:  # no held-out sample of the forgotten classes: the routines go without
            heldout = heldout_all.subset(np.flatnonzero(np.zeros(len(heldout_all), bool)))
        last = None
        last_n = 0
        if LAST_LOCAL_KEY in context.state.array_records:
            last = to_weights(context.state.array_records[LAST_LOCAL_KEY])
            last_n = int(number(context.state.metric_records[LAST_LOCAL_N_KEY], P.NUM_EXAMPLES))
        rc = context.run_config
        seed = client_seed(int(rc.get("seed", 0)), int(cfg.get(P.SERVER_ROUND, 0)), node_client_id(context))
        t0 = time.perf_counter()
        values = routine(
            RoutineInput(
                model,
                (forget.x, forget.y),
                (heldout.x, heldout.y),
                settings,
                cfg,
                seed,
                retain=(retain.x, retain.y) if retain is not None else None,
                last_local=last,
                last_local_n=last_n,
                augment=str(cfg.get(P.AUGMENT, "none")),
            )
        )
        metrics = {k: v for k, v in values.items() if not isinstance(v, bool)}
        metrics.update(
            {
                P.NUM_EXAMPLES: len(forget),
                "train-loss": float(values.get("forget-loss-end", 0.0)),
                "train-seconds": time.perf_counter() - t0,
            }
        )
        return model, MetricRecord(metrics)

    def relearn(self, msg: Message, context: Context) -> Message:
        target, max_steps = read_relearn_request(self.config(msg))
        train, _ = self.data(context)
        data = self.part(context, train, "forget", self.config(msg))
        model = self.model(self.arrays(msg), context)
        rc = context.run_config
        res = relearn_steps(
            model,
            data.x,
            data.y,
            target,
            train_settings(rc),
            max_steps=max_steps,
            seed=client_seed(int(rc.get("seed", 0)), 10_000, node_client_id(context)),
        )
        return Message(relearn_reply(res.steps, res.reached, res.start_accuracy, res.final_accuracy), reply_to=msg)

    def audit(self, msg: Message, context: Context) -> Message:
        return self._measure(msg, context, audit=True)

    def evaluate(self, msg: Message, context: Context) -> Message:
        return self._measure(msg, context, audit=False)

    def _measure(self, msg: Message, context: Context, audit: bool) -> Message:
        cfg = self.config(msg)
        train, heldout = self.data(context)
        recs = msg.content.array_records
        model = self.model(recs[self.array_key(msg)] if self.array_key(msg) in recs else self.arrays(msg), context)
        reference = self.model(recs[P.REFERENCE_RECORD], context) if audit and P.REFERENCE_RECORD in recs else None
        values = measure_client(
            model,
            train,
            heldout,
            forget=self.mask(context, train, cfg),
            removed_classes=self.removed_classes(context),
            reference=reference,
            mia=audit and bool(cfg.get(P.MIA, False)),
        )
        content: dict[str, Any] = {P.METRICS_RECORD: MetricRecord({**values, P.NUM_EXAMPLES: len(heldout)})}
        count = int(cfg.get(P.REFERENCE_COUNT, 0)) if audit else 0
        if count:
            refs = [self.model(recs[P.reference_model_record(j)], context) for j in range(count)]
            masks, forget = self.reference_masks(context, len(train), cfg), self.mask(context, train, cfg)
            scores = attack_scores_client(model, refs, train, heldout, forget, masks)
            content[P.ATTACK_SCORES_RECORD] = MetricRecord(scores)  # type: ignore[arg-type]
        return Message(RecordDict(content), reply_to=msg)

    def calibrate(self, msg: Message, context: Context) -> Message:
        cfg = self.config(msg)
        request = read_calibrate_request(msg.content)
        train, heldout = self.data(context)
        forget = self.part(context, train, "forget", cfg)
        direction = {k: v.astype(np.float64) for k, v in to_weights(request.direction).items()}
        model = self.model(request.base, context)
        state, wire = self.backend.arrays(model)  # copies (bfloat16 as float32), safe to build candidates from
        chosen = self._heldout_like(model, context, forget, heldout)
        like = heldout.subset(chosen)
        others = np.setdiff1d(np.arange(len(heldout)), chosen)
        rest = heldout.subset(others) if len(others) else None

        forget_y = np.asarray(forget.y).astype(np.int64)

        def measured() -> Measurement:
            fl, hl = predict_logits(model, forget.x), predict_logits(model, like.x)
            hits = np.argmax(fl, axis=1) == forget.y
            rest_loss, rest_correct = None, 0.0
            if rest is not None:
                rl = predict_logits(model, rest.x)
                rest_loss, rest_correct = cross_entropy(rl, rest.y), float(np.sum(np.argmax(rl, axis=1) == rest.y))
            return Measurement(
                cross_entropy(fl, forget.y),
                float(np.sum(hits)),
                cross_entropy(hl, like.y),
                float(np.sum(np.argmax(hl, axis=1) == like.y)),
                rest_loss,
                rest_correct,
                np.bincount(forget_y[hits], minlength=fl.shape[1]).astype(np.float64)[: fl.shape[1]],
            )

        per_scale = []
        for c in request.scales:
            self.backend.set_arrays(
                model, {k: (v.astype(np.float64) + c * direction[k]).astype(v.dtype) for k, v in state.items()}, wire
            )
            per_scale.append(measured())
        pre_request = None
        if request.pre_request is not None:  # the memorisation test: the pre-request model on the same samples
            pre, pre_wire = self.backend.arrays(self.model(request.pre_request, context))
            self.backend.set_arrays(model, pre, pre_wire)
            pre_request = measured()
        width = (
            len(per_scale[0].forget_class_correct) if per_scale and per_scale[0].forget_class_correct is not None else 0
        )
        class_n = np.bincount(forget_y, minlength=width)[:width] if width and forget_y.min() >= 0 else None
        stats = client_stats(
            per_scale, pre_request, len(forget), len(like), None if class_n is None else class_n.tolist()
        )
        return Message(calibrate_reply(stats), reply_to=msg)

    def support(self, msg: Message, context: Context) -> Message:
        """The labels this client trains on, counted (a class only departing clients hold is forgotten with them)."""
        train, _ = self.data(context)
        mask = self.mask(context, train, {})
        labels = np.asarray(train.y if mask is None else train.y[~mask])
        if labels.size and (labels.dtype.kind not in "iub" and not np.all(np.mod(labels, 1) == 0)):
            raise ValueError("query.support counts class labels; these labels are not whole numbers")
        return Message(support_reply(labels.astype(np.int64)), reply_to=msg)

    def _heldout_like(self, model: Any, context: Context, forget: ArrayDataset, heldout: ArrayDataset) -> np.ndarray:
        """Indices of the held-out samples like the forget set: its classes; for hard samples, those the same rule
        ranks highest."""
        idx = np.flatnonzero(np.isin(heldout.y, np.unique(forget.y)))
        if len(idx) == 0:
            raise ValueError("no held-out sample of the forgotten classes: calibration needs some")
        req: Mapping[str, Any] = context.state.config_records.get(REQUEST_KEY, {})
        selection = str(req.get("selection", "random"))
        if req.get("scenario") != "samples" or selection not in MODEL_SELECTIONS:
            return idx
        same = heldout.subset(idx)
        scores = selection_scores(selection, model, same.x, same.y, (same.x, same.y))
        k = max(1, int(round(float(req.get("fraction", 0.1)) * len(same))))
        return idx[np.argsort(-scores, kind="stable")[:k]]

    def erasure(self, msg: Message, context: Context) -> Message:
        from ..erasure import erasure_poll

        inbox = context.node_config.get("erasure-inbox")
        site = str(context.node_config.get("site", f"site-{node_client_id(context)}"))
        return Message(
            RecordDict(
                {P.ERASURE_RECORD: ConfigRecord(erasure_poll(str(inbox) if inbox else None, site, self.config(msg)))}
            ),
            reply_to=msg,
        )


def architecture_mismatch(model: torch.nn.Module, record: ArrayRecord) -> str:
    """What keeps ``record`` from loading into ``model`` (missing/unexpected arrays, shapes); empty if it loads."""
    state = model.state_dict()
    problems = []
    missing, extra = sorted(set(state) - set(record)), sorted(set(record) - set(state))
    if missing:
        problems.append(f"missing arrays {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected arrays {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for k in sorted(set(state) & set(record)):
        shape = tuple(record[k].shape)
        if shape != tuple(state[k].shape):
            problems.append(f"'{k}' has shape {shape}, the model expects {tuple(state[k].shape)}")
    return "; ".join(problems)


def _register(
    app: ClientApp, category: str, action: str | None, fn: Callable[[Message, Context], Message], done: list[str]
) -> None:
    """Register ``fn`` unless the app already has a handler for that message type."""
    decorator = getattr(app, category)
    try:
        (decorator(action) if action else decorator())(fn)
    except ValueError as exc:
        if "already registered" not in str(exc):
            raise
    done.append(f"{category}.{action}" if action else category)


def add_identity(app: ClientApp) -> None:
    """Register only :data:`~fed_unlearn.protocol.IDENTIFY` (lets the server name clients by a node-config key)."""
    helper = _Helper(TorchBackend(lambda c: torch.nn.Identity(), default_train), lambda c: ((), ()), [P.IDENTIFY])
    _register(app, "query", "identify", helper.identify, [])


def add_unlearning(
    app: ClientApp,
    model_fn: ModelFn | None = None,
    data_fn: DataFn | None = None,
    *,
    train_fn: TrainFn | None = None,
    predict_fn: PredictFn | None = None,
    fit_fn: FitFn | None = None,
    default_handlers: bool = False,
) -> None:
    """Add the client side of federated unlearning to ``app`` (see the module docstring).

    Parameters
    ----------
    app : ClientApp
        Your ClientApp; your own handlers stay as they are.
    model_fn : callable, optional
        ``model_fn(context) -> torch.nn.Module``: a fresh model of your architecture.
    data_fn : callable
        ``data_fn(context) -> (train, held_out)`` of this node.
    train_fn : callable, optional
        ``train_fn(model, data, instruction, context) -> metrics``: local training in place
        (used on retained data after a deletion, and on the forget set for PUF when the
        client stays); default :func:`default_train`.
    predict_fn : callable, optional
        Instead of ``model_fn``, for a model of any framework (scikit-learn, numpy, JAX):
        ``predict_fn(arrays, x) -> logits`` on the named arrays your ClientApp sends
        (:mod:`fed_unlearn.flower.backends`). Calibration, the deletion request (all but the
        gradient-based selections) and the evaluation and audit measurements then work
        without torch; the methods' local routines need ``model_fn``.
    fit_fn : callable, optional
        With ``predict_fn``: ``fit_fn(arrays, x, y, instruction, context) -> (arrays, metrics)``,
        local training for the messages that train (``train.retain``, ``train.reference``,
        PUF on a forget set).
    default_handlers : bool
        Also register ``train`` (``train_fn`` on all data) and ``evaluate`` (the per-part
        measurements) for an app that has none of its own.

    Raises
    ------
    ValueError
        Without ``data_fn``, or unless exactly one of ``model_fn`` and ``predict_fn`` is given.
    """
    if data_fn is None:
        raise ValueError("add_unlearning needs data_fn(context) -> (train, held_out)")
    if (model_fn is None) == (predict_fn is None):
        raise ValueError("add_unlearning needs either model_fn (a torch model) or predict_fn (any framework)")
    backend: TorchBackend | ArrayBackend
    if model_fn is not None:
        backend = TorchBackend(model_fn, train_fn or default_train)
    else:
        backend = ArrayBackend(predict_fn, fit_fn)  # type: ignore[arg-type]
    handlers: list[str] = []
    helper = _Helper(backend, data_fn, handlers)
    _register(app, "query", "identify", helper.identify, handlers)
    _register(app, "query", "info", helper.info, handlers)
    _register(app, "query", "forget", helper.forget, handlers)
    _register(app, "evaluate", "audit", helper.audit, handlers)
    _register(app, "query", "erasure", helper.erasure, handlers)
    _register(app, "query", "calibrate", helper.calibrate, handlers)
    _register(app, "query", "support", helper.support, handlers)
    if backend.can_fit:
        _register(app, "train", "retain", helper.train_retain, handlers)
        _register(app, "train", "unlearn", helper.unlearn, handlers)
        _register(app, "train", "reference", helper.train_reference, handlers)
    if backend.torch:
        _register(app, "query", "relearn", helper.relearn, handlers)
    if default_handlers:
        if backend.can_fit:
            _register(app, "train", None, helper.train_all, handlers)
        _register(app, "evaluate", None, helper.evaluate, handlers)
