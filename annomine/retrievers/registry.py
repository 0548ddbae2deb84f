"""The channel registry: channel name -> how to build its retriever and which settings it reads.

A channel is one `Channel`: its name, a factory `(ChannelInputs, config) -> retriever` and a config
dataclass (its settings; `NoOptions` when it has none). The retriever answers
`search(queries, k) -> list[list[(product_id, score)]]` (best first, at most k, no product twice)
and pickles: the channels job builds it once on the driver and ships it to the Spark workers.

Built-in channels are the names of `annomine.vocabulary.CHANNELS`; name `c` is the `CHANNEL` of
the module `annomine.retrievers.<c>` (imported on first use). Adding one is that module plus its
name in `CHANNELS`:

    # annomine/retrievers/title_length.py
    @dataclass(frozen=True)
    class TitleLengthConfig:
        shortest_first: bool = True

    def build(inputs: ChannelInputs, config: TitleLengthConfig) -> TitleLengthRetriever: ...

    CHANNEL = Channel("title_length", build, TitleLengthConfig)

Other channels (plugins, tests) call `register(Channel(...))` at run time. Such a channel can run
in the channels job, lands in `retrieval_logs` and in the overlap report; mining, whose output has
a column per built-in channel, only reads the built-in ones.

Where a channel's settings come from (`Channel.make_config`): the `channels:` config section's
keys named in `config_keys` (the built-ins' historical flat keys, e.g. bm25's `k1` is `bm25_k1`),
then `channels.options.<name>` (any config field). `run_key` is the channel's part of the run id;
by default all its config fields, none for a channel without settings.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol

from annomine.vocabulary import CHANNELS

_NAME = re.compile(r"[a-z][a-z0-9_]*")


class Retriever(Protocol):
    def search(self, queries: list[str], k: int) -> list[list[tuple[str, float]]]: ...


@dataclass
class ChannelInputs:
    """What a factory gets besides its config.

    products: pandas frame of the catalog sorted by product_id (product_id, title, description,
    brand, category, attributes, text, content_hash). ctx: the job's `JobContext`, for channels
    that cache in tables (ann: `product_embeddings`). stats: the job's stats dict (add to it).
    """

    products: Any
    ctx: Any = None
    stats: dict = field(default_factory=dict)


@dataclass(frozen=True)
class NoOptions:
    """The config of a channel without settings."""


@dataclass(frozen=True)
class Channel:
    name: str
    factory: Callable[[ChannelInputs, Any], Retriever]
    config: type = NoOptions
    config_keys: Mapping[str, str] = field(default_factory=dict)  # config field -> key of the `channels:` section
    run_key: Callable[[Any], dict] | None = None  # config -> this channel's part of the run id

    def make_config(self, section: Any = None, options: Mapping[str, Any] | None = None):
        """The channel's config: `config_keys` read from `section`, overridden by `options`."""
        from annomine.config import from_dict

        values = {f: getattr(section, key) for f, key in self.config_keys.items() if section is not None}
        values.update(options or {})
        return from_dict(self.config, values, f"channels ({self.name} channel)")

    def key(self, config) -> dict:
        if self.run_key is not None:
            return dict(self.run_key(config))
        values = dataclasses.asdict(config)
        return {self.name: values} if values else {}

    def build(self, inputs: ChannelInputs, config) -> Retriever:
        return self.factory(inputs, config)


_BUILTIN: dict[str, Channel] = {}
_EXTRA: dict[str, Channel] = {}


def _builtin(name: str) -> Channel:
    if name not in _BUILTIN:
        module = importlib.import_module(f"{__package__}.{name}")
        spec = getattr(module, "CHANNEL", None)
        if not isinstance(spec, Channel) or spec.name != name:
            raise TypeError(f"{module.__name__} must define CHANNEL = Channel({name!r}, ...)")
        _BUILTIN[name] = spec
    return _BUILTIN[name]


def names() -> tuple[str, ...]:
    """Registered channels: the built-ins in canonical order, then the others as registered."""
    return CHANNELS + tuple(_EXTRA)


def get(name: str) -> Channel:
    if name in CHANNELS:
        return _builtin(name)
    if name in _EXTRA:
        return _EXTRA[name]
    raise KeyError(f"unknown channel {name!r}; registered channels: {list(names())}")


def registered() -> dict[str, Channel]:
    """name -> Channel for every registered channel."""
    return {name: get(name) for name in names()}


def register(channel: Channel, *, replace: bool = False) -> Channel:
    """Add a channel at run time (built-ins are registered by `vocabulary.CHANNELS`)."""
    if not _NAME.fullmatch(channel.name):
        raise ValueError(f"channel name must match {_NAME.pattern} (it names columns), got {channel.name!r}")
    if channel.name in CHANNELS:
        raise ValueError(f"{channel.name!r} is a built-in channel")
    if channel.name in _EXTRA and not replace:
        raise ValueError(f"channel {channel.name!r} is already registered (pass replace=True)")
    if not dataclasses.is_dataclass(channel.config):
        raise TypeError(f"channel {channel.name!r}: config must be a dataclass, got {channel.config!r}")
    _EXTRA[channel.name] = channel
    return channel


def unregister(name: str) -> None:
    if name in CHANNELS:
        raise ValueError(f"{name!r} is a built-in channel")
    _EXTRA.pop(name, None)


def ordered(channels: Iterable[str]) -> list[str]:
    """`channels` (distinct) in registry order; unregistered names last, as given."""
    channels = list(dict.fromkeys(channels))
    position = {name: i for i, name in enumerate(names())}
    return sorted(channels, key=lambda c: (position.get(c, len(position)), channels.index(c)))


def pairs(channels: Iterable[str] | None = None) -> list[tuple[str, str]]:
    """Every pair of `channels` (default: all registered), in registry order."""
    return list(itertools.combinations(ordered(names() if channels is None else channels), 2))
