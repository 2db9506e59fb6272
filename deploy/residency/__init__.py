"""Residency evidence: `bridgepool verify residency` (verify.py) and its parts.

capture.py (tcpdump on each centre's link, pcap and TCP reassembly, who talked to whom),
tls.py (TLS decryption with the processes' key log, via tshark), search.py (canaries in every
encoding, in streams, HTTP bodies, inflated streams and files), topology.py (the captured
verification federation: netns or loopback), bundle.py (the evidence bundle: JSON, Markdown, HTML).
"""
