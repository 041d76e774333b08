"""The work every peer runs, in one place, so that no peer gets an easier version of it.

Each piece of work exists in two shapes: a coroutine function, for the peers whose workers
run an IO loop (looppool, aiomultiprocess, the ceiling), and a plain function, for
ProcessPoolExecutor, whose workers have no loop. The module sits at the top level of the
benchmarks folder so that spawned workers (aiomultiprocess) can import it by name.
"""

import asyncio

# One unit of CPU work: about 7 ms of pure-Python arithmetic on this project's machine.
# A fixed count rather than a calibrated duration keeps runs comparable across machines.
BURN_UNIT = 100_000


def burn(units):
    """CPU-bound work that holds the GIL the whole time, as parsing or templating does."""
    x = 0
    for i in range(units * BURN_UNIT):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


# -- coroutine shapes (workers with a loop) ----------------------------------------------

async def echo_async(message):
    return message


async def sleep_async(seconds):
    await asyncio.sleep(seconds)


async def burn_async(units):
    return burn(units)


# -- plain shapes (ProcessPoolExecutor) ---------------------------------------------------

def echo(message):
    return message


def sleep(seconds):
    # A ProcessPoolExecutor worker has no loop, so the coroutine gets a fresh one for each
    # call and holds the worker until it ends: the honest translation of the workload.
    asyncio.run(sleep_async(seconds))


ASYNC = {'echo': echo_async, 'sleep': sleep_async, 'burn': burn_async}
PLAIN = {'echo': echo, 'sleep': sleep, 'burn': burn}
