"""virtiofs-reattach: keep virtiofs shares attached to Cloud Hypervisor VMs."""
