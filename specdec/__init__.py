"""specdec wire layer: generated protocol stubs (``specdec.v1``) and the gRPC helpers the services share.

The speculative math lives in ``specdec_core``, which imports nothing from here.
"""
