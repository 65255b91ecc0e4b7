"""Membership that scales: SWIM probes, gossip with a fixed fanout, anti-entropy with one peer.

`swim` and `news` are the pure rules (a member table and its news queue), `wire` the action
bodies and their bounds, `settings` the `membership.*` config keys, and `runner` the thread
and Flight calls that apply them to a node's peer table (docs/protocol.md, "Membership").
"""

from .news import ALIVE, DEAD, EPOCH, ITEM, LEFT, SUSPECT, News, NewsQueue, retransmit_limit
from .runner import Membership, SwimClient, boot_incarnation, membership_action
from .settings import Settings, problems, settings
from .swim import Member, Swim, SwimParams
from .wire import ACTION_PING, ACTION_PING_REQ, ACTION_SYNC, ACTIONS, Message, parse_message

__all__ = [
    "ACTIONS",
    "ACTION_PING",
    "ACTION_PING_REQ",
    "ACTION_SYNC",
    "ALIVE",
    "DEAD",
    "EPOCH",
    "ITEM",
    "LEFT",
    "SUSPECT",
    "Member",
    "Membership",
    "Message",
    "News",
    "NewsQueue",
    "Settings",
    "Swim",
    "SwimClient",
    "SwimParams",
    "boot_incarnation",
    "membership_action",
    "parse_message",
    "problems",
    "retransmit_limit",
    "settings",
]
