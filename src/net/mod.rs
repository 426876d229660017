//! rtnetlink bridge, veth into netns, tap, VXLAN; IPAM; nftables NAT and port maps (issue: container VPS).
