"""Who is who in a deployed federation: the service's checked map of sites, partitions and nodes.

A node says what it is (``query.identify``: partition and site name; ``query.info``: its data
sizes). The service believes it only as far as it can check it:

* with a **site registry**, a node is the site its authenticated node id is bound to, and it
  must serve that site's registered partition; a node that is not registered, or claims
  another partition, is refused (the liar, never the service);
* without one, a node is the site it names; a site or partition another connected node
  already is, or one the checkpoint binds to another partition, is refused;
* a refused node is journaled (``node-refused``), logged and sent nothing more in this run.

Sites need not all be up: the service starts with the sites that connect within
``node-wait-seconds`` (a restart does not wait for erased or excluded sites at all) and a
site that connects later, or comes back under a new node id, is admitted at the start of
the next round with its standing (erased, excluded, strikes) carried over.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Collection, Mapping
from logging import INFO, WARNING

from flwr.app import ArrayRecord
from flwr.common import log
from flwr.serverapp import Grid

from fed_unlearn.erasure import SiteRegistry
from fed_unlearn.flower import Unlearning
from fed_unlearn.journal import Journal

from .queries import ClientInfo, describe_nodes

#: Rounds a node that does not answer its identification is asked again before it is refused.
MAX_IDENTIFY_TRIES = 3


class Membership:
    """The sites of one service run and the nodes that are them (see the module docstring).

    Parameters
    ----------
    grid, journal, strategy :
        The service's grid, journal and strategy (identities, declared sizes, departed and
        excluded nodes are set on the strategy as sites are admitted).
    registry : SiteRegistry, optional
        The operator's binding of site names to node ids and partitions.
    known : mapping
        Site -> partition of every site the federation has had (from the checkpoint).
    gone, excluded : set of str
        Sites erased, and sites excluded for invalid replies (never trained again); the
        service's own sets, which it keeps adding to.
    declared : dict
        Site -> the most examples it may claim (kept across restarts; updated in place).
    strikes : mapping
        Site -> invalid replies so far (kept across restarts).
    timeout : float
        Seconds to wait for a node's identification.
    check : ArrayRecord, optional
        A model every node must be able to load (a user's task).
    """

    def __init__(
        self,
        grid: Grid,
        journal: Journal,
        strategy: Unlearning,
        registry: SiteRegistry | None,
        known: Mapping[str, int],
        gone: set[str],
        excluded: set[str],
        declared: dict[str, int],
        strikes: Mapping[str, int],
        timeout: float,
        check: ArrayRecord | None,
    ) -> None:
        self.grid, self.journal, self.strategy, self.registry = grid, journal, strategy, registry
        self.sites: dict[str, int] = dict(known)
        self.gone, self.excluded = gone, excluded
        self.declared, self.strikes = declared, {s: int(n) for s, n in strikes.items()}
        self.timeout, self.check = timeout, check
        self.clients: dict[int, ClientInfo] = {}
        self.node_of: dict[int, int] = {}
        self.refused: dict[int, str] = {}
        self._tries: Counter[int] = Counter()

    @property
    def site_of(self) -> dict[int, str]:
        """Partition -> site name."""
        return {cid: s for s, cid in self.sites.items()}

    def hidden(self) -> set[int]:
        """Connected nodes that are no site of this federation (not identified yet, or refused)."""
        admitted = set(self.node_of.values())
        return {n for n in self.grid.get_node_ids() if n not in admitted}

    def connect(self, expected: Collection[str] | None, wait_seconds: float) -> None:
        """Admit nodes until every ``expected`` site is connected or ``wait_seconds`` pass.

        ``expected=None`` (a first run without a registry): until as many sites as the nodes
        say the federation has (the median claim, so one node cannot make the service wait).

        Raises
        ------
        RuntimeError
            If no site at all could be admitted in time.
        """
        deadline = time.monotonic() + wait_seconds
        while True:
            self.admit(None)
            names = {self.site_of[c] for c in self.node_of}
            if expected is not None:
                if set(expected) <= names:
                    return
            elif self.clients and len(names) >= statistics.median_low(i.num_partitions for i in self.clients.values()):
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not self.node_of:
            why = f"; refused: {self.refused}" if self.refused else ""
            raise RuntimeError(f"no site connected within {wait_seconds:.0f}s{why}")
        missing = sorted(set(expected or ()) - {self.site_of[c] for c in self.node_of})
        if missing:
            log(WARNING, "starting without sites %s (not connected): they take part again once they connect", missing)
            self.journal.event(None, "server", "sites-absent", f"started without {missing}")

    def admit(self, server_round: int | None) -> list[str]:
        """Identify nodes that connected since the last look and admit the ones that check out; returns their sites."""
        new = sorted(set(self.grid.get_node_ids()) - set(self.node_of.values()) - set(self.refused))
        if not new:
            return []
        found, problems = describe_nodes(self.grid, new, self.timeout, self.check)
        for node, problem in problems.items():
            self._tries[node] += 1
            if "did not answer" not in problem or self._tries[node] >= MAX_IDENTIFY_TRIES:
                self._refuse(node, problem, server_round)
        joined = []
        for info in found:
            name, conflict = self._conflict(info)
            if name is None:
                self._refuse(info.node_id, conflict or "no site", server_round)
            else:
                joined.append(self._admit(info, name))
        return joined

    def _name(self, info: ClientInfo) -> tuple[str | None, str | None]:
        """The site ``info`` is, or why it is none."""
        if self.registry is None:
            return info.site or f"site-{info.client_id}", None
        name = self.registry.site_of_node(info.node_id)
        if name is None:
            return None, f"not in the site registry (says it is {info.site!r})"
        if self.registry.sites[name]["partition-id"] != info.client_id:
            return None, (
                f"registered as {name!r} with partition {self.registry.sites[name]['partition-id']}, "
                f"but claims partition {info.client_id}"
            )
        if info.site and info.site != name:
            self.journal.refuse(
                f"node {info.node_id}",
                info.site,
                f"node registered as {name!r} claims to be {info.site!r}",
                {"node-id": info.node_id},
                None,
            )
            log(WARNING, "node %s is registered as %r but claims %r; the registry wins", info.node_id, name, info.site)
        return name, None

    def _conflict(self, info: ClientInfo) -> tuple[str | None, str | None]:
        """The site ``info`` is, or ``None`` and why not (a claim that contradicts what is known)."""
        name, problem = self._name(info)
        if name is None:
            return None, problem
        cid = info.client_id
        if name in self.sites and self.sites[name] != cid:
            known = self.sites[name]
            return None, f"claims site {name!r} with partition {cid}; the federation has it as partition {known}"
        owner = next((s for s, c in self.sites.items() if c == cid and s != name), None)
        if owner is not None:
            return None, f"claims partition {cid} as site {name!r}; partition {cid} is site {owner!r}"
        old = self.node_of.get(cid)
        if old is not None and old in set(self.grid.get_node_ids()):
            return None, f"claims site {name!r}, which connected node {old} already is"
        return name, None

    def _refuse(self, node: int, problem: str, server_round: int | None) -> None:
        self.refused[node] = problem
        self.journal.event(server_round, f"node {node}", "node-refused", problem)
        log(WARNING, "node %s is not admitted to the federation: %s", node, problem)

    def _admit(self, info: ClientInfo, name: str) -> str:
        """Bind ``info``'s node to site ``name`` and give the strategy what it must know of it."""
        cid, node = info.client_id, info.node_id
        old = self.node_of.get(cid)
        if old is not None:  # the site came back under another node id
            self.strikes[name] = max(self.strikes.get(name, 0), int(self.strategy.strikes[old]))
        self.sites[name], self.clients[cid], self.node_of[cid] = cid, info, node
        self.strategy.set_identity(node, **{"partition-id": cid})
        registered = self.registry.sites[name].get("num-examples") if self.registry is not None else None
        self.declared[name] = int(registered) if registered else self.declared.get(name, info.train_n)
        self.strategy.declare_examples(node, self.declared[name])
        if name in self.gone:
            self.strategy.leave_out(node)
        self.strategy.restore(
            strikes={node: self.strikes[name]} if self.strikes.get(name) else {},
            excluded=[node] if name in self.excluded else [],
        )
        log(INFO, "site %r (partition %d) is node %d", name, cid, node)
        return name
