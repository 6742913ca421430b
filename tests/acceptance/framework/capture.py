# SPDX-License-Identifier: Apache-2.0
"""Records every IP packet that arrives on an interface, one JSON line each, until killed:
{"v": 4|6, "src", "dst", "proto"}. Run inside a test namespace: ip netns exec NS capture.py IF OUT

The bypass test uses it on the "internet" side to prove that nothing from a guest's own
addresses (crafted packets, other protocols, fragments) ever arrives there."""
import json
import socket
import sys

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4

s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
s.bind((sys.argv[1], 0))
out = open(sys.argv[2], "a", buffering=1)
print("ready", flush=True)
while True:
    frame, addr = s.recvfrom(65535)
    if addr[2] == PACKET_OUTGOING or len(frame) < 14:
        continue
    ethertype = int.from_bytes(frame[12:14], "big")
    p = frame[14:]
    if ethertype == 0x0800 and len(p) >= 20:
        rec = {"v": 4, "src": socket.inet_ntoa(p[12:16]), "dst": socket.inet_ntoa(p[16:20]),
               "proto": p[9]}
    elif ethertype == 0x86DD and len(p) >= 40:
        rec = {"v": 6, "src": socket.inet_ntop(socket.AF_INET6, p[8:24]),
               "dst": socket.inet_ntop(socket.AF_INET6, p[24:40]), "proto": p[6]}
    else:
        continue
    out.write(json.dumps(rec) + "\n")
