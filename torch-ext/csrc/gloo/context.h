// Stands in for Gloo's <gloo/context.h> (see README.md).
#pragma once
#include "declarations.h"
