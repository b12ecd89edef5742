"""The built-in methods, one module each; every module registers its method on import
(:func:`llmrec.method.available_methods` imports them all). A new method is a new module
here (or any module that calls :func:`llmrec.method.register`)."""
