"""The product page's Quick Start snippets, as written, with the services they call stubbed.

Each module holds one snippet: the module-level ``@Saga.step`` form needs a module of its
own, since ``Saga()`` takes the steps declared in the module that builds it.
"""
