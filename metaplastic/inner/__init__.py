"""The inner loop: networks, credit-assignment pathways and the online episode (one
``lax.scan`` over samples in which the rule changes the weights after every sample)."""

from ._episode import OBJECTIVES, Episode, InnerResult, apply_rule, guard, online_step, run_episode
from ._feedback import FEEDBACK_MODES, backward, init_feedback
from ._network import ACTIVATIONS, NetState, Network

__all__ = [
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
