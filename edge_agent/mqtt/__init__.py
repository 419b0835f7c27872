"""Devices over MQTT (the only package that imports paho).

- ``contract``       the wire contract, pure: topics, ACL, request parsing, reply routing
- ``coalescer``      merges a stream's chunks into fewer MQTT messages
- ``bridge``         the agent side: subscribe, hand requests to ``serving``, publish replies
- ``transport``      one paho client, configured the same for both sides (TLS, v5/v3.1.1)
- ``credentials``    the broker's users: random passwords, Mosquitto password and ACL files
- ``device_client``  the device side: ``MqttChatClient``, used by ``edgegen mqtt chat``
- ``metrics``        the bridge's Prometheus metrics
"""
