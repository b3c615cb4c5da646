"""The miniature world: a small SD-architecture model, LoRAs and a pixel oracle (see docs/miniworld.md).

Development only (tests, the demo, the benchmarks); the A1111 extension never imports it.
"""
