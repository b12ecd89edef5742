"""The built-in methods, one folder (or one module) each; every one registers its method on
import (:func:`llmrec.method.available_methods` imports them all). A new method is a new
folder or module here and nothing else (docs/architecture.md, "Adding a method"); what two
methods share lives in :mod:`llmrec.methods.common` or below (:mod:`llmrec.data`)."""
