"""The work every peer runs, in one place, so that no peer gets an easier version of it.

Each piece of work exists in two shapes: a coroutine function, for the peers whose workers
run an IO loop (looppool, aiomultiprocess, the ceiling), and a plain function, for
ProcessPoolExecutor, whose workers have no loop. The module sits at the top level of the
benchmarks folder so that spawned workers (aiomultiprocess) can import it by name.
"""

import asyncio
import time

# One unit of CPU work: about 7 ms of pure-Python arithmetic on this project's machine.
# A fixed count rather than a calibrated duration keeps runs comparable across machines.
BURN_UNIT = 100_000


def burn(units):
    """CPU-bound work that holds the GIL the whole time, as parsing or templating does."""
    x = 0
    for i in range(units * BURN_UNIT):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x


# Arithmetic steps between two readings of the clock in spin(): about 15 us, so a 1 ms
# task ends within a few per cent of its time.
SPIN_STEP = 200


def spin(seconds):
    """CPU-bound work for `seconds` by the wall clock, then the seconds back.

    It computes all the while, holding its loop and the GIL as a parser would, but it stops
    on a deadline rather than after a count of steps: W7 and W8 are about how a pool deals
    work to its workers, and on a shared machine a fixed count of steps takes longer
    whenever another program has the CPU, which would blur the dealing with the machine's
    load. So a task holds its worker for exactly its stated time, and W7's ideal, computed
    from the stated times, is a floor no pool can go below on any machine. (W6 measures
    CPU-bound work that slows down with the machine, with burn().)
    """
    clock = time.perf_counter
    end = clock() + seconds
    x = 0
    while clock() < end:
        for i in range(SPIN_STEP):
            x = (x * 31 + i) & 0xFFFFFFFF
    return seconds


# -- coroutine shapes (workers with a loop) ----------------------------------------------

async def echo_async(message):
    return message


async def sleep_async(seconds):
    await asyncio.sleep(seconds)


async def burn_async(units):
    return burn(units)


async def spin_async(seconds):
    return spin(seconds)


async def mixed_async(message):
    """W8's work: ``('cpu', seconds)`` spins and holds the loop throughout; ``('io',
    seconds)`` waits on the loop, which leaves it free for the worker's other tasks."""
    kind, seconds = message
    if kind == 'cpu':
        return spin(seconds)
    await asyncio.sleep(seconds)
    return seconds


# -- plain shapes (ProcessPoolExecutor) ---------------------------------------------------

def echo(message):
    return message


def sleep(seconds):
    # A ProcessPoolExecutor worker has no loop, so the coroutine gets a fresh one for each
    # call and holds the worker until it ends: the honest translation of the workload.
    asyncio.run(sleep_async(seconds))


def mixed(message):
    kind, seconds = message
    if kind == 'cpu':
        return spin(seconds)
    sleep(seconds)
    return seconds


ASYNC = {'echo': echo_async, 'sleep': sleep_async, 'burn': burn_async, 'spin': spin_async,
         'mixed': mixed_async}
PLAIN = {'echo': echo, 'sleep': sleep, 'burn': burn, 'spin': spin, 'mixed': mixed}
