"""The fed-unlearn wire protocol: every message the server may send a client, and every reply it expects.

This module is the client author's reference. It is plain constants (no Flower import);
the strategy (:mod:`fed_unlearn.flower.strategy`) and the client helpers
(:mod:`fed_unlearn.flower.client`) both read them from here.

What a client needs, by use
===========================

* **Nothing beyond an ordinary Flower ClientApp** (a ``train`` handler that replies one
  ArrayRecord and one MetricRecord with ``num-examples``, as for FedAvg) for the methods
  whose forgetting happens on the server — those whose ``departing_task`` is ``train``
  (e.g. ``puf`` and its variants, ``fine-tune``, ``not``, ``mpru``, ``retrain``, and
  ``federaser``, which may send :data:`LOCAL_EPOCHS_RATIO`; a client that ignores it trains
  full rounds) — when the departing clients are named by node id. A departing client's
  PUF round is an ordinary ``train`` message.
* **:data:`IDENTIFY`** to name clients by a node-config key (``partition-id``, ``site``,
  ...) instead of node id. Six lines, or ``fed_unlearn.flower.add_identity(app)``.
* **:data:`TRAIN_UNLEARN`** for the methods whose forgetting clients run a local routine
  (``departing_task`` ``unlearn``: e.g. ``sragu``, ``agu``, ``gradient-ascent``, ``amun``), and
  :data:`FORGET` + :data:`TRAIN_RETAIN` + :data:`TRAIN_UNLEARN` for deletions where the
  client stays (some samples, a class). ``fed_unlearn.flower.add_unlearning(app, ...)``
  registers all of them from a model factory and a data loader.
* **:data:`CALIBRATE`** for the calibrated unlearning step (how far to go, measured on
  the departing client's own forget and held-out data; the helpers answer it for torch
  models and, through ``predict_fn``, for any other); without it the remaining clients'
  ordinary ``evaluate`` replies bound the step. With :data:`SUPPORT` on the clients who
  stay, a whole client's departure also forgets the classes only it held.
* **:data:`INFO`, :data:`AUDIT`, :data:`RELEARN`** for the experiment and the audit
  (what the gold comparison and the leakage audit measure on the client's own data).
* **:data:`ERASURE`** for a deployed site that files its own erasure requests.

Messages
========

``train`` (:data:`TRAIN`)
    Ordinary local training. Content: the global model (an ArrayRecord under the
    strategy's ``arrayrecord_key``, default ``"arrays"``) and a ConfigRecord
    (``"config"``) with ``server-round`` and whatever the wrapped strategy adds (FedProx:
    ``proximal-mu``). Optional keys a client may honour: :data:`LOCAL_EPOCHS_RATIO`,
    :data:`SEED_ROUND`, :data:`AUGMENT`, :data:`KEEP_LAST_LOCAL`. Reply: one ArrayRecord
    and one MetricRecord holding ``num-examples``.
``evaluate`` (:data:`EVALUATE`)
    Ordinary evaluation of the global model; reply: one MetricRecord with ``num-examples``.
    A node that has left is not sent it (unless the strategy is asked to).
``query.identify`` (:data:`IDENTIFY`)
    Config :data:`KEYS`: list of node-config keys. Reply: ConfigRecord :data:`IDENTITY_RECORD`
    holding those of the keys the node's config has (values as they are). The helpers add
    ConfigRecord :data:`CAPABILITIES_RECORD`: ``protocol`` (:data:`VERSION`), ``handlers``
    (message types it answers), ``routines`` (methods whose routine it can run).
``query.info`` (:data:`INFO`)
    Optional ArrayRecord ``arrays``: a model to check against the client's own
    architecture. Reply: MetricRecord ``info`` (``train-n``, ``heldout-n``,
    ``num-classes``, ``input-shape``) and ConfigRecord ``check`` (``architecture``:
    ``"ok"`` or what does not match).
``query.forget`` (:data:`FORGET`)
    The deletion request. Config: ``scenario`` (``client`` | ``samples`` | ``class``),
    ``selection``, ``fraction``, ``class``, ``seed`` (see :mod:`fed_unlearn.deletion`);
    ArrayRecord ``arrays``: the model at request time (model-based selections). The
    client selects its samples, keeps the mask in its node state and replies only
    MetricRecord ``metrics`` (``forget-n``, ``retain-n``) and ConfigRecord ``receipt``
    (``digest``). The samples never leave the node.
``train.retain`` (:data:`TRAIN_RETAIN`)
    As ``train``, on the samples the client keeps (it deleted some). Same reply.
``train.unlearn`` (:data:`TRAIN_UNLEARN`)
    The forget role. Config: :data:`METHOD` (the method; its settings as
    ``<method>.<field>`` keys and any method-specific keys), :data:`ROLES`
    (``"forget"`` or ``"retain,forget"``), :data:`FORGET_ALL` (all train samples are to be
    forgotten: a site being erased). The client runs the method's routine on its forget set
    (or, for a method without one, ordinary training on it). Reply:
    ArrayRecord ``forget-arrays`` + MetricRecord ``forget-metrics`` (``num-examples`` = forget
    set size), plus ``arrays`` + ``metrics`` (training on retained data) for role ``retain``.
``query.relearn`` (:data:`RELEARN`)
    ArrayRecord ``arrays``; config ``target-accuracy``, ``max-steps``. SGD on the forget set
    until the target accuracy; reply MetricRecord ``metrics``: ``relearn-steps``,
    ``relearn-reached``, ``relearn-start-acc``, ``relearn-final-acc``.
``evaluate.audit`` (:data:`AUDIT`)
    ArrayRecord ``arrays``, optional ArrayRecord ``reference`` (the gold model), optional
    ArrayRecords ``ref-0`` ... ``ref-{K-1}`` (the reference models, ``K`` =
    :data:`REFERENCE_COUNT` in the config, with :data:`REFERENCE_SEED`); config ``mia``
    (bool), :data:`FORGET_ALL`. With
    reference models the reply also has MetricRecord ``attack-scores``: per-sample scores
    (lists) ``<attack>-forget`` and ``<attack>-heldout`` for ``rmia``, ``lira`` and ``loss``
    — scores only, never samples. Reply: MetricRecord ``metrics`` with, per part
    (``forget``, ``retain``, ``test``, ``fheld``; :mod:`fed_unlearn.evaluation`), ``<part>-n``,
    ``<part>-correct``, ``<part>-loss-sum`` (and ``-kl-sum``, ``-tv-sum``, ``-disagree-sum``
    against the reference), the membership-inference AUCs, and ``num-examples``.
``query.calibrate`` (:data:`CALIBRATE`)
    How far to unlearn (:mod:`fed_unlearn.calibration`). ArrayRecords ``base``,
    ``direction`` and ``pre-request`` (the model before the request); config ``scales``
    (list of float) and :data:`FORGET_ALL`. The client measures ``base + c * direction``
    for every ``c`` on its forget set and on held-out samples like them; reply MetricRecord
    ``calibration``: what :func:`fed_unlearn.calibration.client_stats` builds — per-scale
    lists ``forget-loss-sum``, ``forget-correct``, ``heldout-loss-sum``, ``heldout-correct``,
    ``forget-auc``, the counts ``forget-n``, ``heldout-n``; when the client has other held-out
    samples (the classes that stay, the samples a hard selection does not rank highest)
    ``rest-loss-sum``, ``rest-correct`` per scale and ``rest-n``; and for the pre-request model
    one-element lists ``pre-forget-loss-sum``, ``pre-forget-loss-sq``, ``pre-forget-correct``,
    ``pre-heldout-correct``, ``pre-heldout-loss-sum``, ``pre-heldout-loss-sq``, ``pre-auc``
    (without them the memorisation test is skipped). Built and read by
    :mod:`fed_unlearn.flower.wire` (``calibrate_request`` / ``calibrate_reply``). Without the handler, the remaining
    clients evaluate the candidate models with their ordinary ``evaluate`` handler instead
    (:mod:`fed_unlearn.flower.stepping`).
``query.support`` (:data:`SUPPORT`)
    Sent to the clients who stay while a whole client's departure is calibrated. No content
    beyond the config. Reply: MetricRecord ``support`` with ``label-counts`` (list: how many
    of the samples the client trains on have label ``0, 1, ...``) — counts only. The server
    adds them up: a class of the departing client that the clients who stay (almost) do not
    hold must stop being predicted (:func:`fed_unlearn.calibration.unsupported_classes`).
    Without it on every client who stays, the class rule is skipped.
``train.reference`` (:data:`TRAIN_REFERENCE`)
    A round of a reference federation of the strong leakage audit: like ``train``, on the
    half of the node's training samples that reference model :data:`REFERENCE_INDEX` of
    :data:`REFERENCE_COUNT` trains on (:func:`fed_unlearn.attacks.client_reference_masks`
    of :data:`REFERENCE_SEED` and the node's client id: the node computes the halves, they
    never travel). Reply as ``train``.
``query.erasure`` (:data:`ERASURE`)
    A deployed site's inbox poll (:mod:`fed_unlearn.erasure`). Config ``acks``,
    ``refused``: request ids the server journaled or refused. Reply: ConfigRecord
    ``erasure`` (``site``, ``count``, ``requests``, ``files``, ``errors``).

A node is sent at most one message per round: Flower may run two messages of one node
concurrently, each on its own copy of the node's ``Context``.
"""

from __future__ import annotations

#: Version of this protocol, reported by the helpers in ``capabilities``.
VERSION = 1

# -- message types -----------------------------------------------------------------------
TRAIN = "train"
EVALUATE = "evaluate"
IDENTIFY = "query.identify"
INFO = "query.info"
FORGET = "query.forget"
TRAIN_RETAIN = "train.retain"
TRAIN_UNLEARN = "train.unlearn"
RELEARN = "query.relearn"
AUDIT = "evaluate.audit"
ERASURE = "query.erasure"
CALIBRATE = "query.calibrate"
SUPPORT = "query.support"
TRAIN_REFERENCE = "train.reference"
#: Every message type of the protocol.
MESSAGE_TYPES = (
    TRAIN,
    EVALUATE,
    IDENTIFY,
    INFO,
    FORGET,
    TRAIN_RETAIN,
    TRAIN_UNLEARN,
    RELEARN,
    AUDIT,
    ERASURE,
    CALIBRATE,
    SUPPORT,
    TRAIN_REFERENCE,
)

# -- records -------------------------------------------------------------------------------
IDENTITY_RECORD = "identity"
CAPABILITIES_RECORD = "capabilities"
CONFIG_RECORD = "config"
#: Keys of the :data:`CAPABILITIES_RECORD`.
PROTOCOL, HANDLERS, ROUTINES = "protocol", "handlers", "routines"
#: The roles a client may play in an unlearning round (see :mod:`fed_unlearn.unlearning.base`).
ROLES = ("retain", "forget")
#: Reply record names per role: (ArrayRecord key, MetricRecord key). The retain role uses
#: the names Flower's FedAvg expects, so an ordinary round's reply is a plain FedAvg reply.
ROLE_KEYS = {"retain": ("arrays", "metrics"), "forget": ("forget-arrays", "forget-metrics")}
#: Data parts a client trains on: everything, the samples it keeps, the samples to forget.
DATA_PARTS = ("all", "retain", "forget")

# -- config keys ---------------------------------------------------------------------------
SERVER_ROUND = "server-round"
KEYS = "keys"
METHOD = "unlearn-method"
ROLES_KEY = "roles"
FORGET_ALL = "forget-all"
LOCAL_EPOCHS_RATIO = "local-epochs-ratio"
SEED_ROUND = "seed-round"
AUGMENT = "augment"
KEEP_LAST_LOCAL = "keep-last-local"
#: What "forgotten" means for the request (``loss-match`` or ``accuracy-floor``) and the floor.
TARGET = "unlearn-target"
FLOOR = "unlearn-floor"
#: Reference models of the strong leakage audit (:mod:`fed_unlearn.attacks`): which one a
#: ``train.reference`` round trains, how many there are (``ref-0`` ... in ``evaluate.audit``).
REFERENCE_INDEX = "reference-index"
REFERENCE_COUNT = "reference-count"
#: The seed of the reference halves (:func:`fed_unlearn.attacks.client_reference_masks`).
REFERENCE_SEED = "reference-seed"
#: Weight key of every reply (FedAvg's default ``weighted_by_key``).
NUM_EXAMPLES = "num-examples"

# -- query records and keys (read and written by :mod:`fed_unlearn.flower.wire` only) ------
#: ``query.info``: reply MetricRecord, its keys; ConfigRecord ``check`` and its key.
INFO_RECORD = "info"
TRAIN_N, HELDOUT_N, NUM_CLASSES, INPUT_SHAPE = "train-n", "heldout-n", "num-classes", "input-shape"
CHECK_RECORD = "check"
ARCHITECTURE = "architecture"
#: ``query.forget``: the request's config keys; reply MetricRecord ``metrics`` + ConfigRecord ``receipt``.
SCENARIO, SELECTION, FRACTION, FORGET_CLASS, SEED = "scenario", "selection", "fraction", "class", "seed"
METRICS_RECORD = "metrics"
FORGET_N, RETAIN_N = "forget-n", "retain-n"
RECEIPT_RECORD = "receipt"
DIGEST = "digest"
#: ``query.relearn``: config keys and reply metrics.
TARGET_ACCURACY, MAX_STEPS = "target-accuracy", "max-steps"
RELEARN_STEPS, RELEARN_REACHED = "relearn-steps", "relearn-reached"
RELEARN_START_ACC, RELEARN_FINAL_ACC = "relearn-start-acc", "relearn-final-acc"
#: ``evaluate.audit``: the membership-inference switch, the gold model's record, the scores' record.
MIA = "mia"
REFERENCE_RECORD = "reference"
ATTACK_SCORES_RECORD = "attack-scores"


#: ``evaluate.audit``: reference model ``j`` travels as ArrayRecord ``ref-{j}``.
REFERENCE_MODEL_PREFIX = "ref-"


def reference_model_record(index: int) -> str:
    """The ArrayRecord name of reference model ``index`` in ``evaluate.audit``."""
    return f"{REFERENCE_MODEL_PREFIX}{index}"


#: ``query.calibrate``: the candidate models' records, the scales, the reply record.
BASE_RECORD, DIRECTION_RECORD, PRE_REQUEST_RECORD = "base", "direction", "pre-request"
SCALES = "scales"
CALIBRATION_RECORD = "calibration"
SUPPORT_RECORD, LABEL_COUNTS = "support", "label-counts"
#: ``query.erasure``: the server's verdicts in the poll's config, the reply record.
ACKS, REFUSED = "acks", "refused"
ERASURE_RECORD = "erasure"

#: What a client must answer, by what the server needs (see the module docstring).
NEEDS = {
    "name clients by a node-config key": (IDENTIFY,),
    "a method with a client routine": (TRAIN_UNLEARN,),
    "a deletion where the client stays (samples, a class)": (FORGET, TRAIN_RETAIN, TRAIN_UNLEARN),
    "a calibrated unlearning step": (CALIBRATE,),
    "the class rule of a calibrated departure (the clients who stay)": (SUPPORT,),
    # every helper but a deployed site's inbox and the strong audit's reference models
    "the experiment and its report": tuple(
        m for m in MESSAGE_TYPES if m not in (TRAIN, EVALUATE, ERASURE, TRAIN_REFERENCE)
    ),
    "a deployed site filing its own requests": (ERASURE,),
    "the strong leakage audit (reference models)": (TRAIN_REFERENCE, AUDIT),
}
