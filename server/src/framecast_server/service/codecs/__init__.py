"""The server's codecs: requests read and results written, one module per direction and protocol.

``requests`` and ``results`` speak framecast.v1 (the Classifier service), ``tensors`` the Open
Inference Protocol. Only the format both ends share comes from the client distribution: the
generated framecast.v1 messages and ``framecast_client.wire_format``.
"""
