"""The engine on the schemas: the lazy reader, the verifier, restore and the writer."""
