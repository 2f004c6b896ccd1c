"""fedsim-fedexp: FedExP (Jhunjhunwala et al., ICLR 2023) as a fedsim plugin package.

Installed (``pip install -e examples/fedsim-fedexp``), its ``fedsim.plugins`` entry point imports
``fedsim_fedexp.protocol``, which registers the strategy ``fedexp``; the server part (``fedsim_fedexp.server``) and
the client part (``fedsim_fedexp.client``) are imported by path when a run needs them.
"""
