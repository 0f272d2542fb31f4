"""`netp serve`: an OpenAI-compatible server over a model's ranks (docs/design.md §11).

server.py starts the ranks and the HTTP thread; engine.py is the ranks'
loop and the request queue; http.py the FastAPI app; api.py OpenAI's
request and response shapes; text.py the chat template and stop strings.
"""
