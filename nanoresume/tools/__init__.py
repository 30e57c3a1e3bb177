"""The command-line tools: users of the library, never imported by it.

``nanoresume train|sample|evaluate|ckpt|self-test`` (:mod:`.commands` picks the tool); the chaos
harness that kills training processes (:mod:`.chaos`) backs the self-test and the tests.
"""
