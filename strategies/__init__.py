"""strategies: Flower message-based strategies and wrappers that run on the server.

Lives here: deadline/straggler handling, compressed-update decoding, async buffering.
Must not: train models, emulate devices or drive the fleet's clock.
"""

from strategies.deadline import DeadlineStrategy, reply_finish_time
from strategies.fedbuff import FedBuff, staleness_weight
from strategies.selection import OverCommit
from strategies.wrapper import StrategyWrapper

__all__ = [
    "DeadlineStrategy",
    "FedBuff",
    "OverCommit",
    "StrategyWrapper",
    "reply_finish_time",
    "staleness_weight",
]
