// Stands in for Gloo's <gloo/rendezvous/store.h> (see README.md).
#pragma once
#include "../declarations.h"
