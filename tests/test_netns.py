"""The host's egress table as the worker reads it back (consumer/sandbox/netns.py): what another worker of
the host allowed, compared with this one's setting. The table itself is tested in test_sandbox_attacks.py."""

from __future__ import annotations

import ipaddress

from consumer.sandbox.netns import allowed_in, merged, shown


def test_an_allow_list_read_back_from_nft_compares_equal_to_the_setting_it_came_from() -> None:
    # nft lists single addresses, prefixes and (auto-merged) ranges; the setting names networks.
    listing = {
        "nftables": [
            {"metainfo": {"version": "1.0.6"}},
            {"set": {"family": "inet", "name": "allow4", "table": "nova_sandbox", "elem": [
                {"prefix": {"addr": "10.9.0.0", "len": 16}},
                "192.168.5.5",
                {"range": ["172.16.0.0", "172.16.1.255"]},
            ]}},
        ]
    }  # fmt: skip
    setting = ["10.9.0.0/16", "192.168.5.5", "172.16.0.0/24", "172.16.1.0/24"]
    assert allowed_in(listing) == merged([ipaddress.ip_network(c) for c in setting])
    assert shown(allowed_in(listing)) == "10.9.0.0/16, 172.16.0.0/23, 192.168.5.5/32"


def test_an_empty_allow_list_differs_from_any_other() -> None:
    empty = allowed_in({"nftables": [{"set": {"name": "allow4"}}]})
    assert empty == [] and shown(empty) == "nothing beyond the defaults"
    assert empty != merged([ipaddress.ip_network("10.9.0.0/16")])
