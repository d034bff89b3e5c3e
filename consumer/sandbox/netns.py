"""A network namespace of its own for each `egress` sandbox of the fork server: veth, NAT, nftables.

A slot is an anonymous network namespace (held only by descriptors: the kernel removes it, and its veth
pair with it, once the worker, its zygote and the sandboxes in it are gone, so a killed worker leaves
nothing behind) joined to the host by a veth pair: `nvsbN` on the host, `eth0` inside, on the /30 number
N of a private block the host does not use, the host side the default route. Slots are made once, on a
thread of their own (unshare and setns act on the calling thread only), kept by the worker, and lent to
one live sandbox at a time: the worker passes the namespace to the zygote with the fork request, and
takes the slot back only once the sandbox's cgroup is empty (no process of it can still be inside).
N is leased with an flock, like sandbox uids, so workers on one host never share a name or a subnet.

The host forwards and masquerades their traffic; one nftables table (`inet nova_sandbox`) filters it,
matching the sandboxes by interface name prefix, so nothing is added per sandbox: the host itself (input),
other sandboxes, the blocked ranges of isolation.py (forward) are refused with an ICMP error (a quick
"No route to host", not a hang); an operator's allow-list and the resolvers of /etc/resolv.conf (port 53)
pass. A resolver on the host's loopback (127.0.0.53, 127.0.0.11) is reached through DNAT: inside the
namespace to the host side of the veth, on the host to the resolver, with route_localnet on both ends.
A slot outlives its sandboxes, and the host's connection tracking remembers their flows: a late reply to
one sandbox's UDP query would be translated back to its slot's address, where the next sandbox (maybe
another client's) could be listening on the same port. So every flow from a slot carries the slot's
conntrack mark (set from a map of every slot name, the same on every worker's start), and before a slot
is lent again its flows are forgotten: one netlink request deletes every conntrack entry with its mark.
That request walks the host's whole conntrack table (about 0.5 ms of CPU with 262,144 buckets), so it is
made only for a slot whose sandbox sent anything: the host end's count of received packets moved. Such a
slot is lent again only once its namespace holds no TCP socket of its last sandbox (see _ready).
The ruleset is applied with `nft -f -`: the kernel's nftables netlink protocol has no maintained Python
binding in our dependencies, and nft applies a whole file in one transaction (atomic, and idempotent:
the table is replaced, never added to, so every worker's start yields the same rules and a second
worker's start leaves the first one's live sandboxes working).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from consumer.sandbox.isolation import BLOCKED_V4, FlockLease, nameservers
from consumer.sandbox.zygote import CLONE_NEWNET, new_netns, setns

log = logging.getLogger(__name__)

IFNAME_PREFIX = "nvsb"
TABLE = "inet nova_sandbox"
# The slots' conntrack marks, in a table of their own: a worker of a release before them replaces
# TABLE whole at its start, and would otherwise take the marking away from this release's slots.
MARKS_TABLE = "inet nova_sandbox_marks"
_LOCKS = Path(tempfile.gettempdir()) / "nova-sandbox-nets"
_SLOTS = 4096  # /30 each: a /18 of the block
# Candidate blocks, the first one the host neither has an address in nor routes: every worker of a host
# picks the same one (the choice depends only on the host's routes, not on the worker).
_BLOCKS = ("10.213.0.0/16", "10.214.0.0/16", "10.215.0.0/16", "172.29.0.0/16")
_INSIDE = "eth0"
# A slot's conntrack mark: its number under a prefix of our own ("nv"), so that no other user of marks
# on the host is matched by the flush.
_MARK_PREFIX = 0x6E760000
_NETLINK_NETFILTER = 12
_NLMSG_ERROR = 2
_REJECT = "reject with icmpx type admin-prohibited"


def _sysctl(path: str, value: str) -> None:
    """A /proc/sys/net knob of the calling thread's network namespace."""
    Path("/proc/sys/net", path).write_text(value)


def _no_ipv6(ifname: str) -> None:
    """No IPv6 on an interface (nothing to do on a kernel without IPv6)."""
    with contextlib.suppress(FileNotFoundError):
        _sysctl(f"ipv6/conf/{ifname}/disable_ipv6", "1")


def find_nft() -> str | None:
    return shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin")


def _nft(nft: str, ruleset: str) -> None:
    done = subprocess.run([nft, "-f", "-"], input=ruleset.encode(), capture_output=True, timeout=30)
    if done.returncode != 0:
        raise OSError(errno.EINVAL, f"nft: {done.stderr.decode(errors='replace').strip()[-500:]}")


def merged(networks: list[ipaddress.IPv4Network]) -> list[tuple[int, int]]:
    """IPv4 networks as merged ranges of addresses (how nft's auto-merged interval set holds them)."""
    spans: list[tuple[int, int]] = []
    for first, last in sorted((int(n.network_address), int(n.broadcast_address)) for n in networks):
        if spans and first <= spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], max(spans[-1][1], last))
        else:
            spans.append((first, last))
    return spans


def shown(spans: list[tuple[int, int]]) -> str:
    if not spans:
        return "nothing beyond the defaults"
    nets = [n for first, last in spans for n in ipaddress.summarize_address_range(
        ipaddress.IPv4Address(first), ipaddress.IPv4Address(last))]  # fmt: skip
    return ", ".join(str(n) for n in nets)


def _allowed_now(nft: str) -> list[tuple[int, int]] | None:
    """The allow-list of the host's sandbox table as another worker left it; None if there is no table."""
    done = subprocess.run([nft, "-j", "list", "set", *TABLE.split(), "allow4"], capture_output=True, timeout=30)
    return allowed_in(json.loads(done.stdout)) if done.returncode == 0 else None


def allowed_in(listing: dict) -> list[tuple[int, int]]:
    """The addresses of an `nft -j list set` listing of allow4, as merged ranges."""
    networks: list[ipaddress.IPv4Network] = []
    for item in listing.get("nftables", []):
        for elem in item.get("set", {}).get("elem", []):
            if isinstance(elem, str):
                networks.append(ipaddress.ip_network(elem))
            elif "prefix" in elem:
                networks.append(ipaddress.ip_network(f"{elem['prefix']['addr']}/{elem['prefix']['len']}"))
            elif "range" in elem:
                first, last = (ipaddress.IPv4Address(a) for a in elem["range"])
                networks.extend(ipaddress.summarize_address_range(first, last))
    return merged([n for n in networks if isinstance(n, ipaddress.IPv4Network)])


def slot_mark(index: int) -> int:
    return _MARK_PREFIX | index


def _forget_flows_request(index: int) -> bytes:
    """The netlink request that deletes every conntrack entry of slot `index` (by its mark), encoded
    once per slot: sent each time the slot comes back."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_CTNETLINK
    from pyroute2.netlink.nfnetlink.nfctsocket import IPCTNL_MSG_CT_DELETE, nfct_msg

    msg = nfct_msg.create_from(mark=slot_mark(index), mark_mask=0xFFFFFFFF)
    msg["nfgen_family"] = socket.AF_INET
    msg["header"]["type"] = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg.encode()
    return bytes(msg.data)


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(BlockingIOError, InterruptedError):
        while True:
            sock.recv(65536)


def _sockets_left(netns: int) -> int:
    """TCP sockets in a network namespace (every state, TIME_WAIT and orphans included). Entered on the
    calling thread and left at once, with nothing else run in between: setns acts on this thread only."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        setns(netns, CLONE_NEWNET)
        try:
            count = 0
            for table in ("tcp", "tcp6"):
                with contextlib.suppress(FileNotFoundError), open(f"/proc/thread-self/net/{table}", "rb") as f:
                    count += f.read().count(b"\n") - 1
            return count
        finally:
            setns(own, CLONE_NEWNET)
    finally:
        os.close(own)


def _elements(cidrs: list[str]) -> str:
    return f"elements = {{ {', '.join(cidrs)} }}" if cidrs else ""


def host_ruleset(allow: list[str], resolvers: list[str]) -> str:
    """The host's table: forward, NAT and the refusals, for every sandbox interface at once."""
    # Sandboxes in a namespace have no IPv6 (README, Sandboxes): IPv6 entries cannot apply (start() says so).
    allow4 = [str(n) for n in (ipaddress.ip_network(c, strict=False) for c in allow) if n.version == 4]
    servers = [ipaddress.ip_address(r) for r in resolvers]
    dns4 = [str(s) for s in servers if s.version == 4 and not s.is_loopback]
    loopback = [str(s) for s in servers if s.version == 4 and s.is_loopback][:1]
    sb = f'"{IFNAME_PREFIX}*"'
    dnat = ""
    if loopback:
        # To the host itself (the veth's host side): matched by type, not by the block, which a worker that
        # started while the host's routes differed may have chosen otherwise.
        dnat = f"iifname {sb} fib daddr type local meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {loopback[0]}"
    marks = ", ".join(f'"{IFNAME_PREFIX}{i}" : {slot_mark(i):#x}' for i in range(_SLOTS))
    return f"""table {MARKS_TABLE}
delete table {MARKS_TABLE}
table {MARKS_TABLE} {{
    map slot_marks {{ type ifname : mark; elements = {{ {marks} }} }}
    chain mark_flows {{
        type filter hook prerouting priority mangle; policy accept;
        iifname {sb} ct mark set iifname map @slot_marks
    }}
}}
table {TABLE}
delete table {TABLE}
table {TABLE} {{
    set allow4 {{ type ipv4_addr; flags interval; auto-merge; {_elements(allow4)} }}
    set dns4 {{ type ipv4_addr; {_elements(dns4)} }}
    set blocked4 {{ type ipv4_addr; flags interval; auto-merge; {_elements(list(BLOCKED_V4))} }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {dnat}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        iifname {sb} oifname != {sb} masquerade
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {sb} ct status dnat meta l4proto {{ tcp, udp }} th dport 53 accept
        iifname {sb} {_REJECT}
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname {sb} ct state established,related accept
        oifname {sb} {_REJECT}
        iifname {sb} jump from_sandbox
    }}
    chain from_sandbox {{
        ip daddr @allow4 accept
        ip daddr @dns4 meta l4proto {{ tcp, udp }} th dport 53 accept
        ip daddr @blocked4 {_REJECT}
        # None is expected (their interfaces have IPv6 off): refused whole should that ever change.
        meta nfproto ipv6 {_REJECT}
    }}
}}
"""


def inside_ruleset(resolvers: list[str], gateway: str) -> str:
    """Inside a slot: DNS to a resolver on the host's loopback goes to the host side of the veth."""
    loopback = [r for r in resolvers if ipaddress.ip_address(r).version == 4 and ipaddress.ip_address(r).is_loopback]
    return f"""table ip nova_dns {{
    chain output {{
        type nat hook output priority -100; policy accept;
        ip daddr {{ {", ".join(loopback)} }} meta l4proto {{ tcp, udp }} th dport 53 dnat to {gateway}
    }}
    chain postrouting {{
        type nat hook postrouting priority 100; policy accept;
        oifname "{_INSIDE}" ip saddr 127.0.0.0/8 masquerade
    }}
}}
"""


def _host_block() -> str:
    """The first candidate block that overlaps no address or route of the host (ours aside)."""
    from pyroute2 import IPRoute

    taken: list[ipaddress.IPv4Network] = []
    with IPRoute() as ip:
        ours = {link["index"] for link in ip.get_links() if str(link.get_attr("IFLA_IFNAME")).startswith(IFNAME_PREFIX)}
        for addr in ip.get_addr(family=socket.AF_INET):
            if addr["index"] not in ours:
                taken.append(ipaddress.ip_network(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False))
        for route in ip.get_routes(family=socket.AF_INET, table=254):
            if route["dst_len"] and route.get_attr("RTA_OIF") not in ours:
                taken.append(ipaddress.ip_network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False))
    for block in _BLOCKS:
        if not any(ipaddress.ip_network(block).overlaps(net) for net in taken):
            return block
    raise OSError(errno.EADDRINUSE, f"every candidate block ({', '.join(_BLOCKS)}) is in use on this host")


@dataclass
class NetSlot:
    """One prepared namespace: lent to one live sandbox at a time."""

    index: int
    fd: int
    ifname: str
    lease: FlockLease
    pool: EgressNetworks = field(repr=False)
    forget_flows: bytes = field(default=b"", repr=False)
    # Packets the host end had received from the slot when its flows were last forgotten (None: never).
    received: int | None = None

    def packets_received(self) -> int | None:
        try:
            fd = os.open(f"/sys/class/net/{self.ifname}/statistics/rx_packets", os.O_RDONLY)
            try:
                return int(os.read(fd, 32))
            finally:
                os.close(fd)
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        """Back to the pool: call only once no process of the sandbox that had it is left."""
        self.pool.give_back(self)


class EgressNetworks:
    """The worker's slots, and the host's side of their network (ruleset, forwarding)."""

    def __init__(self, nft: str, resolvers: list[str]) -> None:
        self.nft = nft
        self.resolvers = resolvers
        self.block = ipaddress.ip_network(_BLOCKS[0])  # until _prepare_host picks one
        self._free: list[NetSlot] = []
        self._sequence = 0
        # ctnetlink, in the host's namespace (made here, on the worker's thread): slots' flows forgotten.
        self._conntrack = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        self._conntrack.bind((0, 0))
        self._conntrack.setblocking(False)
        # One thread: it enters slots' namespaces while it sets them up, and always comes back.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="nova-netns")
        self._closed = False

    @classmethod
    def start(cls, allow: list[str]) -> tuple[EgressNetworks | None, str]:
        """Apply the host's ruleset and make a first slot; (None, why) where that cannot be done here."""
        if os.geteuid() != 0:
            return None, "not root"
        nft = find_nft()
        if nft is None:
            return None, "no nft binary (Debian package nftables)"
        try:
            import pyroute2  # noqa: F401
        except ImportError:
            return None, "pyroute2 is not installed"
        resolvers = [r for r in nameservers() if _is_ip(r)]
        unreachable = [c for c in allow if ipaddress.ip_network(c, strict=False).version == 6]
        if unreachable:
            log.warning(
                "sandbox networks: NOVA_SANDBOX_EGRESS_ALLOW entries %s are out of reach: sandboxes in network "
                "namespaces have no IPv6; name the hosts' IPv4 addresses",
                ", ".join(unreachable),
            )
        try:
            networks = cls(nft, resolvers)
        except OSError as exc:  # no ctnetlink (nfnetlink_conntrack) on this host
            return None, f"could not open the host's connection tracking ({exc})"
        try:
            # On the slot thread: pyroute2's synchronous API runs an event loop, which cannot nest in
            # the worker's.
            networks._thread.submit(networks._prepare_host, allow).result()
            networks._free.append(networks._first_use(networks._thread.submit(networks._create).result()))
        except Exception as exc:  # nft refused, netlink refused, no namespaces: the fallback is said
            networks.close()
            return None, f"could not prepare sandbox network namespaces ({exc})"
        return networks, ""

    def _prepare_host(self, allow: list[str]) -> None:
        self.block = ipaddress.ip_network(_host_block())
        before = _allowed_now(self.nft)
        _nft(self.nft, host_ruleset(allow, self.resolvers))
        mine = merged([ipaddress.ip_network(c, strict=False) for c in allow if ":" not in c])
        if before is not None and before != mine:
            # One table serves every worker of the host: this start changed what the others' sandboxes reach.
            log.warning(
                "sandbox networks: this host's sandboxes were allowed %s (another worker's NOVA_SANDBOX_EGRESS_ALLOW)"
                " and are now allowed %s, for every worker's sandboxes on this host: give every worker of a host"
                " the same setting",
                shown(before),
                shown(mine),
            )
        if Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0":
            # Host-wide: the ruleset handles only the sandboxes' interfaces, so the host now forwards
            # between its others too (README, Sandboxes); said once, by the worker that turned it on.
            log.warning("sandbox networks: turning on IPv4 forwarding for this host (net.ipv4.ip_forward=1)")
        _sysctl("ipv4/ip_forward", "1")

    async def lend(self) -> NetSlot:
        """A free slot that holds nothing of its last sandbox, made now (once, on the slot thread) if every
        one is lent or still holds sockets of its last sandbox."""
        slot = self._take()
        if slot is not None:
            return slot
        made = asyncio.get_running_loop().run_in_executor(self._thread, self._create)
        try:
            slot = await asyncio.shield(made)
        except asyncio.CancelledError:
            # The thread makes it all the same: into the free list, or its namespace, veth pair and
            # lease would be held, lent to nobody, until the worker exits.
            made.add_done_callback(lambda f: f.cancelled() or f.exception() or self.give_back(f.result()))
            raise
        return self._first_use(slot)

    def give_back(self, slot: NetSlot) -> None:
        """Back to the free list (call only once no process of its sandbox is left); what its sandbox left
        in it is looked at when it is lent again (_ready)."""
        if self._closed:
            self._closed_slot(slot)
        else:
            self._free.append(slot)

    def _take(self) -> NetSlot | None:
        """The free slot given back last of those ready to be lent; one whose namespace still holds
        sockets of its last sandbox stays in the list, one whose flows cannot be forgotten is closed."""
        for i in range(len(self._free) - 1, -1, -1):
            slot = self._free[i]
            ready = self._ready(slot)
            if ready is None:
                continue
            del self._free[i]
            if ready:
                return slot
            self._closed_slot(slot)  # its flows might still be translated back to it: not lent again
        return None

    def _ready(self, slot: NetSlot) -> bool | None:
        """Whether nothing of the slot's last sandbox is left for the next one to find: True if it sent
        nothing since its flows were last forgotten (it made no flow and no socket; an unknown count is
        taken as one that moved), or they are forgotten now; None while its namespace still holds its
        sockets (closing or orphaned ones, listed in /proc/net/tcp and by sock_diag with their remote
        addresses: gone within seconds, as the namespace keeps no TIME_WAIT); False if its flows could
        not be forgotten."""
        if slot.received is not None and slot.packets_received() == slot.received:
            return True
        if _sockets_left(slot.fd):
            return None
        return self._forget_flows(slot)

    def _first_use(self, slot: NetSlot) -> NetSlot:
        """A slot just made, ready to be lent: a killed worker's slot of the same number may have left
        flows with its mark."""
        if not self._ready(slot):
            self._closed_slot(slot)
            raise OSError(f"could not forget the connections of sandbox network slot {slot.index} (ctnetlink)")
        return slot

    def _forget_flows(self, slot: NetSlot) -> bool:
        """Delete the host's conntrack entries of the slot's flows: the kernel does it within the send, and
        its acknowledgement is waiting when send returns. False if they could not be. On the worker's
        thread only (the socket is not shared). Records the slot's packet count read before the request:
        a packet counted after it is seen as one sent since."""
        count = slot.packets_received()
        self._sequence = self._sequence % 0x7FFFFFFF + 1
        request = bytearray(slot.forget_flows)
        struct.pack_into("=I", request, 8, self._sequence)
        error = errno.EIO
        try:
            _drain(self._conntrack)  # an acknowledgement left by a failed exchange is not this one's
            self._conntrack.send(request)
            for _ in range(8):
                answer = self._conntrack.recv(65536)
                # nlmsghdr (length, type, flags, sequence, port), then nlmsgerr's error (0 or -errno).
                if len(answer) >= 20 and struct.unpack_from("=HHI", answer, 4)[::2] == (_NLMSG_ERROR, self._sequence):
                    error = -struct.unpack_from("=i", answer, 16)[0]
                    break
        except OSError as exc:
            error = exc.errno or errno.EIO
        if error not in (0, errno.ENOENT):  # ENOENT: nothing of the slot was tracked
            log.error("sandbox networks: could not forget slot %s's connections (%s); not lent again", slot.index,
                      os.strerror(error))  # fmt: skip
            return False
        slot.received = count
        return True

    def _closed_slot(self, slot: NetSlot) -> None:
        # Its namespace, and the veth pair with it, goes with this last descriptor.
        os.close(slot.fd)
        slot.lease.release()

    def _addresses(self, index: int) -> tuple[str, str]:
        base = self.block.network_address + 4 * index
        return str(base + 1), str(base + 2)

    def _create(self) -> NetSlot:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        # The lowest free number: names and subnets stay few, and a killed worker's are the first reused.
        lease = FlockLease(_LOCKS, 0, _SLOTS, "sandbox network slot", lowest=True)
        index = lease.value
        ifname = f"{IFNAME_PREFIX}{index}"
        host_addr, inside_addr = self._addresses(index)
        host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = -1
        try:
            fd = new_netns(host_ns)
            with IPRoute() as ip:
                # Ours by the lease: a leftover of a killed worker whose namespace the kernel has not
                # finished removing.
                for old in ip.link_lookup(ifname=ifname):
                    with contextlib.suppress(NetlinkError):
                        ip.link("del", index=old)
                ip.link("add", ifname=ifname, kind="veth", peer={"ifname": _INSIDE, "net_ns_fd": fd})
                host_if = ip.link_lookup(ifname=ifname)[0]
                _no_ipv6(ifname)
                _sysctl(f"ipv4/conf/{ifname}/route_localnet", "1")
                ip.addr("add", index=host_if, address=host_addr, prefixlen=30)
                ip.link("set", index=host_if, state="up")
            setns(fd, CLONE_NEWNET)
            try:
                self._inside(inside_addr, host_addr)
            finally:
                setns(host_ns, CLONE_NEWNET)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            lease.release()
            raise
        finally:
            os.close(host_ns)
        return NetSlot(index, fd, ifname, lease, self, _forget_flows_request(index))

    def _inside(self, address: str, gateway: str) -> None:
        """In the slot's namespace (this thread entered it; new_netns brought loopback up): eth0, the
        route out, DNS."""
        from pyroute2 import IPRoute

        # No IPv6 inside: no link-local address to reach the host's side with, and the host routes
        # only IPv4 for sandboxes (an IPv6 connect fails at once with "Network is unreachable").
        _no_ipv6(_INSIDE)
        _sysctl(f"ipv4/conf/{_INSIDE}/route_localnet", "1")
        # A sandbox's connections end with it, for the next one on this slot not to find (see give_back):
        # no TIME_WAIT (a new connection takes a fresh port anyway), orphans given up on within seconds.
        _sysctl("ipv4/tcp_max_tw_buckets", "0")
        _sysctl("ipv4/tcp_fin_timeout", "1")
        _sysctl("ipv4/tcp_orphan_retries", "1")
        with IPRoute() as ip:
            inside = ip.link_lookup(ifname=_INSIDE)[0]
            ip.addr("add", index=inside, address=address, prefixlen=30)
            ip.link("set", index=inside, state="up")
            ip.route("add", dst="0.0.0.0/0", gateway=gateway)
        if any(ipaddress.ip_address(r).is_loopback for r in self.resolvers):
            # nft started from this thread runs in the namespace it is in.
            _nft(self.nft, inside_ruleset(self.resolvers, gateway))

    def _destroy(self, slots: list[NetSlot]) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        # Deleting the host ends removes the pairs now, rather than when the kernel gets round to
        # removing the namespaces (after their last descriptor, closed here).
        with IPRoute() as ip:
            for slot in slots:
                for index in ip.link_lookup(ifname=slot.ifname):
                    with contextlib.suppress(NetlinkError):
                        ip.link("del", index=index)
                os.close(slot.fd)
                slot.lease.release()

    def close(self) -> None:
        """Remove every slot not lent (the provider closes its sandboxes first; one lent still is
        removed when given back). On the worker's thread: slots are given back there."""
        self._thread.submit(self._destroy, self._closing()).result()
        self._thread.shutdown(wait=False)

    async def aclose(self) -> None:
        """close() from the event loop: marked closed here, the slots removed on the slot thread."""
        await asyncio.get_running_loop().run_in_executor(self._thread, self._destroy, self._closing())
        self._thread.shutdown(wait=False)

    def _closing(self) -> list[NetSlot]:
        self._closed = True
        free, self._free = self._free, []
        self._conntrack.close()
        return free


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
