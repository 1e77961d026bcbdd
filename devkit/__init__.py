"""mesh-agent's development kit: what the tests, the demo (demo/) and the benchmarks (bench/) share.

A Kubernetes API emulator (devkit.kubeapi, also `python -m devkit.kubeapi`), a whole agent on loopback
(devkit.rig), bundles in istioctl's format (devkit.bundles), an HTTPS bundle server (devkit.bundleserver),
install roots (devkit.roots), the real Envoy (devkit.envoy), cloud identities (devkit.identity), free ports
(devkit.ports) and polling (devkit.waiting). Never shipped: the .deb and the wheel hold agent/ only.
"""
