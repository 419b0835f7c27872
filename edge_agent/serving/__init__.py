"""The OpenAI API's logic, independent of transport (REST and MQTT call the same objects).

- ``protocol``    the OpenAI wire format: request, response, chunk and error models
- ``bodies``      reading a request's JSON (UTF-8, NaN, depth, lone surrogates), REST and MQTT
- ``lifecycle``   the model's lifecycle: load, swap, retire, drain (``ModelHost``)
- ``generation``  what chat and completions share: limits, admission, responses, streams
- ``chat`` / ``completion`` / ``embedding`` / ``models``   one module per endpoint
- ``api``         ``OpenAIServing``: the endpoints behind one object; counts every outcome

Results are values: an ``ErrorResult`` (status + OpenAI error body), a response dict, or an
async iterator of chunk dicts. Only ``edge_agent.rest`` knows HTTP.
"""
