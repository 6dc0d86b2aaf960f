"""Test doubles shipped with the package: a Cloud Hypervisor API double and a vhost-user backend."""
