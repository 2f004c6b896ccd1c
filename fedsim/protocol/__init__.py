"""One protocol module per algorithm: what its server part and client part agree on, and its registration.

A protocol module holds the strategy's parameters (with their declared constraints), the message keys, and typed
builders and parsers of every request and reply; the server part (``fedsim/strategies/<algo>.py``) and the client
part (``fedsim/clients/<algo>.py``) both import it and never each other. It imports neither torch nor any training
code, so listing and validating scenarios stays cheap; the registry imports every module here.
"""
