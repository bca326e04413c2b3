"""The inner loop: networks, credit-assignment pathways and the online episode (one
``lax.scan`` over samples in which the rule changes the weights after every sample)."""

from ._episode import OBJECTIVES, Episode, InnerResult, apply_rule, guard, online_step, run_episode
from ._feedback import (
    CREDIT_PATHWAYS,
    FEEDBACK_MODES,
    AbstractCreditPathway,
    Backprop,
    DirectFeedbackAlignment,
    FeedbackAlignment,
    KolenPollack,
    PredictiveCoding,
    SignSymmetric,
    as_pathway,
    backward,
    init_feedback,
    register_pathway,
)
from ._network import ACTIVATIONS, NetState, Network

__all__ = [
    "register_pathway",
    "as_pathway",
    "SignSymmetric",
    "PredictiveCoding",
    "KolenPollack",
    "FeedbackAlignment",
    "DirectFeedbackAlignment",
    "Backprop",
    "AbstractCreditPathway",
    "CREDIT_PATHWAYS",
    "ACTIVATIONS",
    "Episode",
    "FEEDBACK_MODES",
    "InnerResult",
    "NetState",
    "Network",
    "OBJECTIVES",
    "apply_rule",
    "backward",
    "guard",
    "init_feedback",
    "online_step",
    "run_episode",
]
